"""Loading and saving models: external data, atomic writes, and the checks that make bad input exit 2.

A model that ONNX can parse is not necessarily one hwnas can work on: an empty file parses as an empty
ModelProto, so "has a graph with nodes" and "uses a supported ai.onnx opset" are checked here, once,
for every command.

Large models stay on disk. When a model's external data exceeds `LARGE_MODEL_BYTES`, `load_model`
leaves its big tensors where they are: each keeps its external-data reference, with the location made
absolute (`external_ref`), and is read only when something needs its values — memory-mapped, one
tensor at a time (`map_external`). ONNX and ONNX Runtime refuse absolute locations, so such a *lazy*
model goes through hwnas: `save_model` streams every tensor into the new data file (never building the
whole model in memory), and `hwnas.graph.session.make_session` hands ONNX Runtime the model with
locations relative to a folder (`with_relative_refs`), which ORT memory-maps. Models under the limit are
loaded whole, as before. docs/large-models.md has the memory this costs.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import uses_external_data

from hwnas.errors import BadInputError

SUPPORTED_OPSETS = range(11, 24)  # ai.onnx versions whose semantics the passes were written against
PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto cannot exceed 2 GB; larger weights go external
EXTERNAL_DATA_THRESHOLD = 1 << 30  # write weights externally well before the hard limit
LARGE_MODEL_BYTES = 1 << 30  # more external data than this stays on disk when loaded (read lazily)
INLINE_BYTES = 64 << 10  # in a large model, external tensors smaller than this are read in anyway
SIZE_THRESHOLD = 1024  # initializers of at least this many bytes go to the data file when writing externally
_ALIGNMENT = 64 << 10  # big tensors start on 64 KiB boundaries in data files we write (mmap-friendly)
_SMALL_ALIGNMENT = 64
_COPY_CHUNK = 16 << 20
# element types whose raw bytes are a plain little-endian array numpy can map (sub-byte types are packed)
MAPPABLE_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
})


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise BadInputError("model imports no ai.onnx opset")


def load_model(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, with its external data, or raise BadInputError with a one-line reason.

    External data over `LARGE_MODEL_BYTES` is not read: the big tensors keep absolute references to
    their bytes (see the module docstring). With `load_external_data=False` references are left as
    written (relative to the model's folder).
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"no such file: {p}")
    if p.is_dir():
        raise BadInputError(f"is a directory, not an ONNX model: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except DecodeError as e:
        raise BadInputError(f"not an ONNX model (cannot parse {p}: {e})") from None
    except (OSError, ValueError, RuntimeError) as e:  # truncated files
        raise BadInputError(f"cannot load {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if load_external_data:
        _attach_external_data(model, p)
    validate_model(model, str(p))
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not also initializers (IR < 4 lists weights as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


ModelLike = str | os.PathLike | onnx.ModelProto


def as_model(model: ModelLike) -> onnx.ModelProto:
    """A validated model: a ModelProto as given, a path loaded (lazily for large external data)."""
    if isinstance(model, onnx.ModelProto):
        validate_model(model)
        return model
    return load_model(model)


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
    _check_acyclic(model.graph, origin)
    _check_tensor_sizes(model, origin)


def _check_acyclic(graph: onnx.GraphProto, origin: str) -> None:
    """A node that (through others) consumes its own output makes the model unrunnable: bad input."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    users: list[list[int]] = [[] for _ in graph.node]
    waiting = []
    for i, node in enumerate(graph.node):
        deps = {producer[name] for name in node.input if name in producer}
        waiting.append(len(deps))
        for d in deps:
            users[d].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        done += 1
        for user in users[ready.pop()]:
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if done < len(graph.node):
        stuck = next(node for node, count in zip(graph.node, waiting) if count)
        raise BadInputError(f"{origin}: the graph has a cycle (through node {stuck.name or stuck.op_type!r}); "
                            "an ONNX graph must be acyclic")


def _check_tensor_sizes(model: onnx.ModelProto, origin: str) -> None:
    """Inline data must be as long as the tensor's dims say; a corrupt file is bad input, not a model to write."""
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
            continue
        expected = _expected_bytes(tensor)
        if expected is not None and len(tensor.raw_data) != expected:
            raise BadInputError(
                f"{origin}: tensor {tensor.name!r} holds {len(tensor.raw_data)} bytes of data but its dims "
                f"{list(tensor.dims)} need {expected}: the file is corrupt"
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


# ---- tensors and their external data ----------------------------------------------------------------


@dataclass(frozen=True)
class ExternalRef:
    """Where a lazily loaded tensor's bytes are: an absolute file path, offset and length."""

    path: str
    offset: int
    length: int


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers, then tensor attributes (Constant values...) and
    sparse tensors, of the main graph, its subgraphs and its local functions."""
    yield from initializer_tensors(model)
    yield from _graph_tensors(model.graph, initializers=False)
    for function in model.functions:
        yield from _node_tensors(function.node, initializers=False)


def initializer_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The initializers of the main graph and of its subgraphs (If/Loop bodies)."""
    yield from _graph_tensors(model.graph, initializers=True)


def _graph_tensors(graph: onnx.GraphProto, initializers: bool) -> Iterator[onnx.TensorProto]:
    if initializers:
        yield from graph.initializer
    else:
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    yield from _node_tensors(graph.node, initializers)


def _node_tensors(nodes, initializers: bool) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if not initializers:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g, initializers)
            for g in attr.graphs:
                yield from _graph_tensors(g, initializers)


def external_ref(tensor: onnx.TensorProto) -> ExternalRef | None:
    """The reference of a tensor that `load_model` left on disk (absolute location), else None."""
    if not uses_external_data(tensor):
        return None
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not os.path.isabs(location) or "length" not in info:
        return None
    return ExternalRef(location, int(info.get("offset") or 0), int(info["length"]))


def set_external_ref(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` refer to `length` bytes at `offset` of `location` instead of holding them."""
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def external_refs(model: onnx.ModelProto) -> list[ExternalRef]:
    """The distinct on-disk references of a lazily loaded model (empty for a model held in memory)."""
    refs = (external_ref(t) for t in all_tensors(model))
    return list(dict.fromkeys(r for r in refs if r is not None))


def lazy_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weights that a lazily loaded model keeps on disk."""
    return sum(r.length for r in external_refs(model))


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    if tensor.data_type not in MAPPABLE_TYPES:
        return None
    return math.prod(tensor.dims) * _itemsize(tensor.data_type)


@functools.cache
def _itemsize(data_type: int) -> int:
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def _resolve(tensor: onnx.TensorProto, base: str, origin: str) -> ExternalRef:
    """The absolute reference of a tensor's external data as written (relative to the model's folder)."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = f"cannot load {origin}: external data of tensor {tensor.name!r}"
    if not location or os.path.isabs(location):
        raise BadInputError(f"{where} needs a location relative to the model, not {location!r}")
    path = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base, path]) != base:
        raise BadInputError(f"{where}: {location} is outside the model's folder")
    if not os.path.isfile(path):
        raise BadInputError(f"{where}: file {location} not found")
    size = os.path.getsize(path)
    try:
        offset = int(info.get("offset") or 0)
        expected = _expected_bytes(tensor)
        length = int(info["length"]) if info.get("length") else (size - offset if expected is None else expected)
    except ValueError:
        raise BadInputError(f"{where}: offset or length is not a number") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise BadInputError(f"{where}: {location} is too short ({size} bytes) for {length} bytes at offset {offset}")
    return ExternalRef(path, offset, length)


def _attach_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read external data into the model, or, for a large model, leave the big tensors referenced."""
    base = os.path.realpath(path.parent)
    resolved = [(t, _resolve(t, base, str(path))) for t in all_tensors(model) if uses_external_data(t)]
    lazy = sum(ref.length for _, ref in resolved) > LARGE_MODEL_BYTES
    for tensor, ref in resolved:
        if lazy and ref.length >= INLINE_BYTES:
            set_external_ref(tensor, ref.path, ref.offset, ref.length)
        else:
            tensor.raw_data = read_external(ref)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def read_external(ref: ExternalRef) -> bytes:
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        data = f.read(ref.length)
    if len(data) != ref.length:
        raise BadInputError(f"external data file {ref.path} is shorter than its model says")
    return data


def map_external(ref: ExternalRef, data_type: int, dims) -> np.ndarray:
    """The values of an on-disk tensor, memory-mapped read-only (so only the pages read cost memory).

    The array remembers where it came from (`mapped_ref`), so that a weight a pass read but did not
    change is written back as the same reference rather than copied.
    """
    shape = tuple(int(d) for d in dims)
    expected = _expected_bytes(_tensor_header("", data_type, shape))
    if expected is None or expected != ref.length:  # packed or odd types: let onnx decode a copy
        tensor = _tensor_header("", data_type, shape)
        tensor.raw_data = read_external(ref)
        return onnx.numpy_helper.to_array(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    if sys.byteorder == "big":
        dtype = dtype.newbyteorder("<")
    if expected == 0:
        return np.empty(shape, dtype)
    array = np.memmap(ref.path, dtype=dtype, mode="r", offset=ref.offset, shape=shape)
    array._hwnas_ref = (ref, data_type, array.ctypes.data)
    return array


def mapped_ref(array: np.ndarray) -> tuple[ExternalRef, int] | None:
    """(reference, element type) of an array that is exactly a `map_external` mapping, else None."""
    origin = getattr(array, "_hwnas_ref", None)
    if origin is None or array.ctypes.data != origin[2] or not array.flags.c_contiguous:
        return None
    ref, data_type, _ = origin
    return (ref, data_type) if array.nbytes == ref.length else None


def _tensor_header(name: str, data_type: int, dims) -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    tensor.name, tensor.data_type = name, data_type
    tensor.dims.extend(int(d) for d in dims)
    return tensor


def reference_tensor(name: str, data_type: int, dims, ref: ExternalRef) -> onnx.TensorProto:
    """A TensorProto that refers to on-disk bytes (what `load_model` makes of a large tensor)."""
    tensor = _tensor_header(name, data_type, dims)
    set_external_ref(tensor, ref.path, ref.offset, ref.length)
    return tensor


def with_relative_refs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """A copy of a lazy model whose references are relative to one folder, and that folder ('' and the
    model itself when it holds its weights in memory).

    The folder is the deepest one holding every data file the model reads (ONNX Runtime resolves
    external data against it and refuses absolute locations and links that leave it).
    """
    if not external_refs(model):
        return model, ""  # held in memory: nothing to relocate, nothing copied
    out = onnx.ModelProto()
    out.CopyFrom(model)  # cheap: the big weights are references
    refs = [(t, external_ref(t)) for t in all_tensors(out)]
    refs = [(t, r) for t, r in refs if r is not None]
    folder = os.path.commonpath([os.path.dirname(r.path) for _, r in refs])
    for tensor, ref in refs:
        set_external_ref(tensor, os.path.relpath(ref.path, folder), ref.offset, ref.length)
    return out, folder


class DataFile:
    """Appends tensors to an external data file, each aligned, each distinct source written once."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._file = open(self.path, "wb")
        self._copied: dict[ExternalRef, int] = {}
        self.tensors = 0

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _start(self, length: int) -> int:
        alignment = _ALIGNMENT if length >= _ALIGNMENT else _SMALL_ALIGNMENT
        offset = self._file.tell()
        padding = -offset % alignment
        if padding:
            self._file.write(b"\0" * padding)
        self.tensors += 1
        return offset + padding

    def write(self, data) -> tuple[int, int]:
        """Append bytes (or a C-contiguous array); returns (offset, length)."""
        view = memoryview(data).cast("B")
        offset = self._start(len(view))
        self._file.write(view)
        return offset, len(view)

    def write_array(self, array: np.ndarray) -> tuple[int, int]:
        """Append an array's elements as ONNX raw data (C order, little-endian); returns (offset, length)."""
        array = np.ascontiguousarray(array)
        if sys.byteorder == "big" and array.dtype.byteorder == "=":
            array = array.byteswap()
        return self.write(array.view(np.uint8).reshape(-1) if array.ndim else array.reshape(1).view(np.uint8))

    def copy(self, ref: ExternalRef) -> tuple[int, int]:
        """Append the bytes `ref` points at, copied file to file (no copy in this process's memory)."""
        if ref in self._copied:
            return self._copied[ref], ref.length
        offset = self._start(ref.length)
        self._file.flush()
        with open(ref.path, "rb") as src:
            _copy_range(src, self._file, ref.offset, offset, ref.length)
        self._file.seek(offset + ref.length)
        self._copied[ref] = offset
        return offset, ref.length


def _copy_range(src, dst, src_offset: int, dst_offset: int, length: int) -> None:
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src.fileno(), dst.fileno(), min(length - done, 1 << 30),
                                   src_offset + done, dst_offset + done)
            if n == 0:
                break
            done += n
    except (AttributeError, OSError):
        pass  # no copy_file_range here (or not across these file systems): copy in chunks
    src.seek(src_offset + done)
    dst.seek(dst_offset + done)
    while done < length:
        chunk = src.read(min(_COPY_CHUNK, length - done))
        if not chunk:
            raise BadInputError(f"external data file {src.name} is shorter than its model says")
        dst.write(chunk)
        done += len(chunk)


# ---- saving --------------------------------------------------------------------------------------------


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer) + sum(
        len(a.t.raw_data) for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR
    )


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write atomically: to a temporary name in the same directory, then rename over the target.

    Weights go to `<name>.data` beside the model when asked, when they would push the protobuf toward
    its 2 GB limit, or when the model was loaded lazily (its weights are still on disk; they are
    streamed into the new data file one tensor at a time). A crash mid-write leaves the previous file
    (if any) untouched; the caller's model is not changed.
    """
    p = check_output_path(path)
    lazy = bool(external_refs(model))
    if external_data is None or lazy:
        external_data = lazy or _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    tmpdir = Path(tempfile.mkdtemp(prefix=".hwnas-", dir=p.parent))
    try:
        tmp_model = tmpdir / p.name
        if external_data:
            data_name = p.name + ".data"
            shell, moved = _externalize(model, tmpdir / data_name, data_name)
            _write_proto(shell, tmp_model)
            if moved is not None:  # None: every tensor was under the size threshold
                final = p.parent / data_name
                os.replace(tmpdir / data_name, final)
                _follow_replaced_file(model, str(final.resolve()), moved)
        else:
            _write_proto(model, tmp_model)
        os.replace(tmp_model, p)
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()
    return p


def _externalize(model: onnx.ModelProto, data_path: Path, data_name: str) -> tuple[onnx.ModelProto, dict | None]:
    """A copy of `model` whose weights are in `data_path` (referenced as `data_name`), and a map from
    each on-disk source the model read to its offset in the new file (None when nothing was written).
    Big in-memory initializers are written from memory, on-disk ones copied file to file."""
    shell = onnx.ModelProto()
    shell.CopyFrom(model)  # for a lazy model this copies no big weights
    moved: dict[ExternalRef, int] = {}
    with DataFile(data_path) as data:
        for tensor in all_tensors(shell):
            ref = external_ref(tensor)
            if ref is not None:
                offset, length = data.copy(ref)
                moved[ref] = offset
                set_external_ref(tensor, data_name, offset, length)
        for tensor in initializer_tensors(shell):  # as onnx does: initializers only, raw bytes only
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= SIZE_THRESHOLD:
                offset, length = data.write(tensor.raw_data)
                set_external_ref(tensor, data_name, offset, length)
        written = data.tensors
    if not written:
        data_path.unlink()
        return shell, None
    return shell, moved


def _follow_replaced_file(model: onnx.ModelProto, replaced: str, moved: dict) -> None:
    """If the model read its weights from the data file just replaced (output over input), point its
    references at the same bytes in the new file."""
    for tensor in all_tensors(model):
        ref = external_ref(tensor)
        if ref is not None and os.path.realpath(ref.path) == replaced and ref in moved:
            set_external_ref(tensor, replaced, moved[ref], ref.length)


def _write_proto(model: onnx.ModelProto, path: Path) -> None:
    try:
        data = model.SerializeToString()
    except ValueError as e:  # over the 2 GB protobuf limit
        raise BadInputError(f"cannot write {path.name}: {e}") from None
    with open(path, "wb") as f:
        f.write(data)
