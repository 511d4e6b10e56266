"""Reports: the JSON report of DESIGN.md (versioned) and, later, HTML."""

from hwnas.report.json_report import SCHEMA_VERSION, write_json

__all__ = ["SCHEMA_VERSION", "write_json"]
