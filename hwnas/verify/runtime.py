"""ONNX Runtime sessions and inputs for verification and calibration.

The reference is the model as written, run with every graph optimization off, so that ORT's own
rewrites cannot hide (or cause) a difference.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from hwnas.errors import CheckFailedError
from hwnas.graph.shapes import Shape, graph_inputs

_SESSION_BYTES_LIMIT = 1 << 30  # beyond this hand ORT a file, not serialized bytes


def make_session(
    model: onnx.ModelProto,
    optimized: bool = False,
    threads: int = 1,
    providers: list | None = None,
) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    providers = providers or ["CPUExecutionProvider"]
    try:
        if model.ByteSize() < _SESSION_BYTES_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        with tempfile.TemporaryDirectory(prefix="hwnas-session-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            onnx.external_data_helper.load_external_data_for_model(model, tmp)
            return ort.InferenceSession(path, opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types; all mean "cannot run this model"
        raise CheckFailedError(f"cannot verify: ONNX Runtime cannot load the model ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


_NP_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def random_feeds(model: onnx.ModelProto, shapes: Mapping[str, Shape], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal for floats, small non-negative integers for ints, random bools."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph_inputs(model):
        elem = value.type.tensor_type.elem_type
        dtype = _NP_DTYPES.get(elem)
        if dtype is None:
            raise CheckFailedError(f"cannot verify: input {value.name!r} has an unsupported type {elem}")
        shape = shapes[value.name]
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[value.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(None, dict(feeds))
    except Exception as e:
        raise CheckFailedError(f"cannot verify: ONNX Runtime failed to run the model ({_first_line(e)})") from None
