"""Loading and saving models: external data, atomic writes, and the checks that make bad input exit 2.

A model that ONNX can parse is not necessarily one hwnas can work on: an empty file parses as an empty
ModelProto, so "has a graph with nodes" and "uses a supported ai.onnx opset" are checked here, once,
for every command.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_model

from hwnas.errors import BadInputError

SUPPORTED_OPSETS = range(11, 24)  # ai.onnx versions whose semantics the passes were written against
PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto cannot exceed 2 GB; larger weights go external
EXTERNAL_DATA_THRESHOLD = 1 << 30  # write weights externally well before the hard limit


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise BadInputError("model imports no ai.onnx opset")


def load_model(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, with its external data, or raise BadInputError with a one-line reason."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"no such file: {p}")
    if p.is_dir():
        raise BadInputError(f"is a directory, not an ONNX model: {p}")
    try:
        model = onnx.load(str(p), load_external_data=load_external_data)
    except DecodeError as e:
        raise BadInputError(f"not an ONNX model (cannot parse {p}: {e})") from None
    except (OSError, ValueError, RuntimeError) as e:  # truncated files, missing external data
        raise BadInputError(f"cannot load {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    validate_model(model, str(p))
    return model


def validate_model(model: onnx.ModelProto, origin: str = "model") -> None:
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise BadInputError(f"{origin} has no graph (empty or not an ONNX model)")
    if not model.graph.output:
        raise BadInputError(f"{origin} has no graph outputs")
    opset = ai_onnx_opset(model)
    if opset not in SUPPORTED_OPSETS:
        raise BadInputError(
            f"{origin} uses ai.onnx opset {opset}; supported: "
            f"{SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}"
        )


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail before any work is done if `path` cannot be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise BadInputError(f"output path is a directory: {p}")
    if not parent.exists():
        blocker = next((a for a in [parent, *parent.parents] if a.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise BadInputError(f"cannot write {p}: {blocker} is a file, not a directory")
        raise BadInputError(f"cannot write {p}: directory {parent} does not exist")
    if not parent.is_dir():
        raise BadInputError(f"cannot write {p}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"cannot write {p}: directory {parent} is not writable")
    return p


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer) + sum(
        len(a.t.raw_data) for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR
    )


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write atomically: to a temporary name in the same directory, then rename over the target.

    Weights go to `<name>.data` beside the model when asked or when they would push the protobuf toward
    its 2 GB limit. A crash mid-write leaves the previous file (if any) untouched.
    """
    p = check_output_path(path)
    if external_data is None:
        external_data = _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    tmpdir = Path(tempfile.mkdtemp(prefix=".hwnas-", dir=p.parent))
    try:
        tmp_model = tmpdir / p.name
        if external_data:
            data_name = p.name + ".data"
            onnx.save_model(
                model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                location=data_name, size_threshold=1024,
            )
            if (tmpdir / data_name).exists():  # absent when every tensor is under the size threshold
                os.replace(tmpdir / data_name, p.parent / data_name)
            # save_model moved the weights out of `model`; read them back so the caller's model is whole.
            load_external_data_for_model(model, str(p.parent))
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, p)
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()
    return p
