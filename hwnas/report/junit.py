"""JUnit XML for `hwnas check --junit FILE`: CI systems show each budget as a test case.

One `<testsuite name="hwnas check">` with one `<testcase>` per requested budget, named as the CLI
option (`max-latency-ms`, `max-params`, ...) and classed under the target (`hwnas.check.npu-32x32`).
A failed budget carries `<failure message="...">` whose message names the budget and the numbers; a
passed one carries its message in `<system-out>`. The estimator's warnings go to the suite's
`<system-out>`. Built with xml.etree (escaping is its job) and written atomically.

GitHub Actions (e.g. a JUnit report action), GitLab CI (`artifacts:reports:junit`) and Jenkins read
this form.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from hwnas.gate import CheckResult
from hwnas.report.json_report import write_text_atomic

SUITE_NAME = "hwnas check"


def junit_xml(result: CheckResult, model: str = "") -> str:
    """The JUnit XML document for a check result, as text (UTF-8 declaration included)."""
    failures = len(result.failed)
    suite = ET.Element("testsuite", {
        "name": SUITE_NAME,
        "tests": str(len(result.items)),
        "failures": str(failures),
        "errors": "0",
        "skipped": "0",
    })
    props = ET.SubElement(suite, "properties")
    for name, value in (("target", result.target), ("model", model),
                        *((f"input_shape.{k}", "x".join(map(str, v))) for k, v in result.input_shapes.items())):
        if value:
            ET.SubElement(props, "property", {"name": name, "value": str(value)})
    classname = f"hwnas.check.{result.target}"
    for item in result.items:
        case = ET.SubElement(suite, "testcase", {"name": item.name, "classname": classname})
        if item.passed:
            ET.SubElement(case, "system-out").text = item.message
        else:
            failure = ET.SubElement(case, "failure", {"message": item.message, "type": f"budget:{item.name}"})
            failure.text = "\n".join([item.message, *item.details])
    if result.warnings:
        ET.SubElement(suite, "system-out").text = "\n".join(f"warning: {w}" for w in result.warnings)
    suites = ET.Element("testsuites", {"name": SUITE_NAME, "tests": str(len(result.items)),
                                       "failures": str(failures), "errors": "0"})
    suites.append(suite)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_junit(path: str | os.PathLike, result: CheckResult, model: str = "") -> Path:
    """Write the JUnit XML atomically (temporary file in the same folder, then os.replace)."""
    return write_text_atomic(path, junit_xml(result, model), ".xml")
