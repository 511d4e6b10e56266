"""ONNX Runtime sessions and inputs: for verification, calibration, measurement and shape inference.

It sits in the graph layer, the bottom floor, because `hwnas.graph.shapes` asks ORT for the shapes
that ONNX shape inference leaves open; everything above imports it, it imports only `hwnas.graph.io`.

The reference is the model as written, run with every graph optimization off, so that ORT's own
rewrites cannot hide (or cause) a difference.

A lazily loaded model (weights left on disk, hwnas.graph.io) is handed to ORT with its external data:
the model's bytes with every location relative to one folder, and that folder, so ORT memory-maps
the data files itself rather than receiving a copy. A mapped weight costs resident memory once ORT
has read it, for as long as the session lives; so a verification session of such a model
(`optimized=False`) maps its weights only while it runs (`MappedSession`), and a reference and a
candidate never hold both sets of weights at once. docs/large-models.md has the numbers.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from hwnas.errors import BadInputError, CheckFailedError, HwnasError
from hwnas.graph.io import graph_inputs, with_relative_refs

_SESSION_BYTES_LIMIT = 1 << 30  # beyond this hand ORT a file, not serialized bytes
# ORT's own log lines (several, coloured, per failure) would come before hwnas's one-line error, which
# carries ORT's message already: only fatal ones are printed.
ORT_LOG_SEVERITY = 4
_ALLOCATION_FAILED = re.compile(r"Failed to allocate memory for requested buffer of size (\d+)")


def quiet_ort() -> None:
    """Quiet ORT's default logger: the graph optimizers, and sessions made by onnx-graphsurgeon, log to it."""
    ort.set_default_logger_severity(ORT_LOG_SEVERITY)


def session_options(optimized: bool, threads: int) -> ort.SessionOptions:
    """ORT's options for every hwnas session: all graph optimizations or none, quiet logging."""
    quiet_ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = ORT_LOG_SEVERITY
    return opts


def make_session(
    model: onnx.ModelProto,
    optimized: bool = False,
    threads: int = 1,
    providers: list | None = None,
) -> ort.InferenceSession | MappedSession:
    opts = session_options(optimized, threads)
    providers = providers or ["CPUExecutionProvider"]
    shell, folder = with_relative_refs(model)
    if folder:  # weights on disk: ORT reads them from `folder`
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        data = shell.SerializeToString()
        if optimized:
            return _open(data, opts, providers)
        return MappedSession(data, opts, providers)
    try:
        if model.ByteSize() < _SESSION_BYTES_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        with tempfile.TemporaryDirectory(prefix="hwnas-session-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            onnx.external_data_helper.load_external_data_for_model(model, tmp)
            return ort.InferenceSession(path, opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types; all mean "cannot run this model"
        raise ort_failure(e, "cannot load the model") from None


def probe_session(model: onnx.ModelProto, names: Iterable[str]) -> ort.InferenceSession | MappedSession:
    """A session of a copy of `model` that can also return the named intermediate tensors (`run(names, ...)`).
    A name that is already an output or a graph input is not declared again (an input: take it from the feeds)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in declared)
    return make_session(probe)


def _open(model: bytes, opts: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types; all mean "cannot run this model"
        raise ort_failure(e, "cannot load the model") from None


@dataclass(frozen=True)
class IOInfo:
    """What a session says about an input or output (ORT's NodeArg, without a tie to the session)."""

    name: str
    type: str
    shape: list


class MappedSession:
    """An InferenceSession for a model whose weights ORT memory-maps, open only while it runs.

    It answers `run`, `get_inputs`, `get_outputs` and `get_providers` like an InferenceSession. Each
    `run` opens a session (ORT maps the data files: milliseconds), runs it and closes it, which unmaps
    the weights it read; loading errors surface here, when the session is made, as they would for a
    plain one.
    """

    def __init__(self, model: bytes, opts: ort.SessionOptions, providers: list):
        self._model, self._opts, self._providers = model, opts, providers
        session = _open(model, opts, providers)
        self._inputs = [IOInfo(a.name, a.type, list(a.shape)) for a in session.get_inputs()]
        self._outputs = [IOInfo(a.name, a.type, list(a.shape)) for a in session.get_outputs()]
        self._provider_names = session.get_providers()

    def get_inputs(self) -> list[IOInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[IOInfo]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return list(self._provider_names)

    def run(self, output_names, input_feed, run_options=None) -> list:
        session = _open(self._model, self._opts, self._providers)
        try:
            return session.run(output_names, input_feed, run_options)
        finally:
            del session


def ort_failure(e: BaseException, what: str) -> HwnasError:
    """The one-line error for an ORT failure: bad input when the model needs more memory than there is."""
    allocation = _ALLOCATION_FAILED.search(str(e))
    if allocation:
        return BadInputError(
            f"the model asks for more memory than this machine has: ONNX Runtime could not allocate "
            f"{int(allocation[1]) / 1e9:.3g} GB for one tensor (the machine has {_physical_memory() / 1e9:.3g} GB)"
        )
    return CheckFailedError(f"cannot verify: ONNX Runtime {what} ({_first_line(e)})")


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


def random_feeds(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
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
    except Exception as e:  # ORT raises its own exception types; all mean "cannot run this model"
        raise ort_failure(e, "failed to run the model") from None


def run_per_sample(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run each sample (first axis of every feed) on its own, as calibration data is stored, and join each
    output's results flattened: a model exported with batch 1 accepts nothing else, and drift compares
    outputs as flat vectors anyway."""
    count = len(next(iter(feeds.values())))
    per_sample = [run(session, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(count)]
    return [np.concatenate([sample[j].ravel() for sample in per_sample]) for j in range(len(per_sample[0]))]
