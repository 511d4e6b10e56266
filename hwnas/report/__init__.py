"""Reports: the JSON report of docs/report-schema.md (versioned), a self-contained HTML report, JUnit XML for CI gates."""

from hwnas.report.json_report import SCHEMA_VERSION, write_json

__all__ = ["SCHEMA_VERSION", "write_json"]
