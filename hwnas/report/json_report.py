"""JSON reports, written atomically, with a schema version so that consumers can rely on the fields."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from hwnas.errors import BadInputError
from hwnas.graph.io import check_output_path

SCHEMA_VERSION = 1


def _clean(value):
    """JSON has no inf/nan: write them as strings rather than emitting invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps(report: dict) -> str:
    return json.dumps(_clean({"schema_version": SCHEMA_VERSION, **report}), indent=2)


def read_json(path: str | os.PathLike, what: str):
    """Parse a JSON file the user named; unreadable or invalid files are bad input, named as `what`."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except OSError as e:
        raise BadInputError(f"cannot read {what} {p}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{what} {p} is not valid JSON: {e}") from None


def write_text_atomic(path: str | os.PathLike, text: str, suffix: str) -> Path:
    """Write UTF-8 text through a temporary file in the same folder, then os.replace: never a partial file."""
    p = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=".hwnas-", suffix=suffix, dir=p.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        os.unlink(tmp)
        raise
    return p


def write_json(path: str | os.PathLike, report: dict) -> Path:
    return write_text_atomic(path, dumps(report) + "\n", ".json")
