"""Between ONNX protobufs and onnx-graphsurgeon graphs, the representation passes work on.

`to_graph` lifts Constant-node weights to initializers first, so a weight is always a `gs.Constant`
whatever the exporter did. `to_model` restores what a drop-in replacement must keep: the original's IR
version, opset imports, metadata and the exact input/output declarations (dynamic dims included).
Stale `value_info` is dropped because rewrites change channel counts.

Large models (hwnas.graph.io, "Large models stay on disk"): a weight that a lazily loaded model keeps on
disk becomes a Constant with `ExternalValues`, read (memory-mapped) only when a pass asks for its values.
Passes write new arrays for the weights they change; `release_weights`, which the pass manager calls
after every pass that changed a large graph and `to_model` calls before exporting one, moves those
arrays to a temporary data file and turns weights that were read but not changed back into references,
so that at most one pass's worth of new weights is ever held in memory and exporting copies none.
"""

from __future__ import annotations

import atexit
import heapq
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from hwnas.graph import io as graph_io
from hwnas.graph.constants import lift_constants


class ReadOnlyValues(LazyValues):
    """A weight's values, loaded on first access as a read-only array: `gs.Graph.copy()` shares arrays
    between copies, so a pass that wrote into one in place would change every other copy (the search's
    candidates, the original a result is verified against). Writing raises instead; passes build new arrays.
    """

    def load(self) -> np.ndarray:
        values = super().load()
        values.setflags(write=False)
        return values


class ExternalValues(LazyValues):
    """The values of a weight kept on disk: memory-mapped read-only when first accessed.

    `tensor` (what onnx-graphsurgeon exports) is a fresh TensorProto holding only the reference, so an
    export never reads the weight, and renaming one Constant cannot rename another that shares it.
    """

    def __init__(self, tensor: onnx.TensorProto):
        ref = graph_io.external_ref(tensor)
        if ref is None:
            raise ValueError(f"tensor {tensor.name!r} has no on-disk reference")
        self.ref = ref
        super().__init__(tensor)

    @property
    def tensor(self) -> onnx.TensorProto:
        out = onnx.TensorProto()
        out.CopyFrom(self._proto)
        return out

    @tensor.setter
    def tensor(self, value: onnx.TensorProto) -> None:
        self._proto = onnx.TensorProto()
        self._proto.CopyFrom(value)

    def load(self) -> np.ndarray:
        return graph_io.map_external(self.ref, self._proto.data_type, self.shape)

    def __str__(self) -> str:
        return f"ExternalValues (shape={self.shape}, dtype={self.dtype}, {self.ref.path}@{self.ref.offset})"


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(lift_constants(model))
    for tensor in _constants(graph):
        values = tensor._values
        if type(values) is LazyValues:
            external = graph_io.external_ref(values.tensor) is not None  # memory-mapped read-only
            tensor._values = ExternalValues(values.tensor) if external else ReadOnlyValues(values.tensor)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
            tensor.shape = None  # recomputed on demand; a pass must never trust a stale shape
    return graph


def constant_holders(graph: gs.Graph) -> Iterator[tuple[gs.Constant, gs.Node | None]]:
    """Every Constant of the graph and of its subgraphs, each once, with the node whose attribute holds it
    (a Constant node inside an If/Loop body: `to_graph` lifts only top-level ones) or None for a tensor
    that nodes read."""
    seen: set[int] = set()
    pending = [graph]
    while pending:
        g = pending.pop()
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor, None
        for node in g.nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Graph):
                    pending.append(value)
                elif isinstance(value, gs.Constant) and id(value) not in seen:
                    seen.add(id(value))
                    yield value, node


def _constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Every Constant of the graph and of its subgraphs, each once."""
    return (tensor for tensor, _ in constant_holders(graph))


def _weight_nbytes(tensor: gs.Constant) -> int:
    values = tensor._values
    return int(values.nbytes) if isinstance(values, (LazyValues, np.ndarray)) else 0


def release_weights(graph: gs.Graph) -> int:
    """For a graph with over `LARGE_MODEL_BYTES` of weights: write its large in-memory weights to a
    temporary data file and hold them as references, so that the arrays are freed; weights that were
    memory-mapped and not changed become references again without being copied. Returns the bytes
    written. Smaller graphs are left alone.

    The temporary files live until the process exits: a model exported from the graph may refer to them
    after the graph is gone (they are copied into the output by `hwnas.graph.io.save_model`).
    """
    constants = list(_constants(graph))
    if sum(map(_weight_nbytes, constants)) <= graph_io.LARGE_MODEL_BYTES:
        return 0
    spill: graph_io.DataFile | None = None
    written = 0
    try:
        for tensor in constants:
            values = tensor._values
            if not isinstance(values, np.ndarray) or not _exports_as_is(tensor):
                continue
            mapped = graph_io.mapped_ref(values)
            if mapped is not None:
                ref, data_type = mapped
            elif values.nbytes >= graph_io.INLINE_BYTES and _onnx_type(values) is not None:
                if spill is None:
                    spill = _spill_file()
                offset, length = spill.write_array(values)
                ref, data_type = graph_io.ExternalRef(spill.path, offset, length), _onnx_type(values)
                written += length
            else:
                continue
            tensor._values = ExternalValues(graph_io.reference_tensor(tensor.name, data_type, values.shape, ref))
    finally:
        if spill is not None:
            spill.close()
    return written


def _exports_as_is(tensor: gs.Constant) -> bool:
    """The Constant exports with its values' own dtype (no export_dtype conversion)."""
    export = tensor._export_dtype
    return export is None or (isinstance(export, np.dtype) and export == tensor._values.dtype)


def _onnx_type(values: np.ndarray) -> int | None:
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    except (KeyError, TypeError, ValueError):
        return None
    return data_type if data_type in graph_io.MAPPABLE_TYPES else None


def _spill_file() -> graph_io.DataFile:
    folder = Path(tempfile.mkdtemp(prefix="hwnas-weights-")).resolve()
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return graph_io.DataFile(folder / "weights.data")


def stable_toposort(graph: gs.Graph) -> gs.Graph:
    """Order nodes topologically, keeping the current order wherever it is already valid.

    onnx-graphsurgeon's own toposort sorts by depth level, which interleaves branches and can raise
    peak activation memory (ORT runs nodes in this order); here a node only moves when one of its
    inputs is produced later (Kahn's algorithm with the current position as priority).
    """
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    producers = {id(n): {id(t.inputs[0]) for t in n.inputs if t.inputs and id(t.inputs[0]) in position} for n in graph.nodes}
    for n in graph.nodes:  # an If/Loop body may read outer tensors: they are inputs of the node too
        for sub in n.attrs.values():
            if isinstance(sub, gs.Graph):
                for t in sub._foreign_tensors().values():
                    if t.inputs and id(t.inputs[0]) in position:
                        producers[id(n)].add(id(t.inputs[0]))
    users: dict[int, list] = {id(n): [] for n in graph.nodes}
    for n in graph.nodes:
        for p in producers[id(n)]:
            users[p].append(n)
    waiting = {id(n): len(producers[id(n)]) for n in graph.nodes}
    ready = [(position[id(n)], n) for n in graph.nodes if waiting[id(n)] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, node = heapq.heappop(ready)
        order.append(node)
        for user in users[id(node)]:
            waiting[id(user)] -= 1
            if waiting[id(user)] == 0:
                heapq.heappush(ready, (position[id(user)], user))
    if len(order) != len(graph.nodes):
        raise ValueError("graph has a cycle")
    graph.nodes = order
    return graph


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """The ModelProto of `graph`, with the template's signature and metadata. A large graph's weights
    are released first (`release_weights`), so the model holds references, not copies, of them."""
    stable_toposort(graph.cleanup(remove_unused_graph_inputs=False))
    release_weights(graph)
    model = gs.export_onnx(graph, do_type_check=False)
    opsets = _merged_opsets(template, model)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items())
    # the template's IR version, unless a raised opset (quantize raises it to 13) needs a newer one
    model.ir_version = max(template.ir_version, onnx.helper.find_min_ir_version_for(list(model.opset_import), True))
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(template, field))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    declared = {v.name: v for v in list(template.graph.input) + list(template.graph.output)}
    for values in (model.graph.input, model.graph.output):
        for value in values:
            if value.name in declared:
                value.CopyFrom(declared[value.name])
    del model.graph.value_info[:]
    return model


def _merged_opsets(template: onnx.ModelProto, model: onnx.ModelProto) -> dict[str, int]:
    """The template's opset imports, raised where a pass raised them (quantize: opset 13) and with the
    domains a pass added (com.microsoft for 16-bit Q/DQ); the graph's own default-domain version is
    only ever the template's or one a pass set on purpose."""
    def key(domain: str) -> str:
        return "" if domain == "ai.onnx" else domain

    opsets = {key(o.domain): o.version for o in template.opset_import}
    for o in model.opset_import:
        if key(o.domain) in opsets and key(o.domain) != "":
            continue
        opsets[key(o.domain)] = max(o.version, opsets.get(key(o.domain), 0))
    return opsets


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a weight tensor, or None when it is computed at run time.

    A weight kept on disk (`ExternalValues`) comes back memory-mapped afresh and is not cached on the
    Constant: the pages the caller reads are dropped as soon as it lets go of the array. (Caching it, as
    `Constant.values` does, would keep every weight a pass ever read resident until the garbage
    collector gets to the replaced Constants, which onnx-graphsurgeon links in reference cycles.)
    """
    if not isinstance(tensor, gs.Constant):
        return None
    if isinstance(tensor._values, ExternalValues):
        return tensor._values.load()
    return tensor.values


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def private_constant(graph: gs.Graph, tensor: gs.Tensor, owner: gs.Node) -> str | None:
    """Why `tensor` cannot be rewritten in place as `owner`'s weight, or None when it can."""
    if const_value(tensor) is None:
        return f"{tensor.name} is not a constant"
    if any(user is not owner for user in tensor.outputs):
        return f"weight {tensor.name} is shared with another node"
    if is_graph_output(graph, tensor):
        return f"weight {tensor.name} is a graph output"
    return None


class _TakenNames:
    """The names a graph's nodes and tensors use, kept per graph so that minting a name is O(1).

    Rebuilding them per call (`Graph.tensors()` walks every node) made a pass that names one tensor per
    site quadratic in the graph's size. The set is a superset of the names in use: names `unique_name`
    hands out are added, names of nodes appended to `graph.nodes` are picked up on the next call, and a
    new `graph.nodes` list (cleanup, toposort, an assignment) rebuilds it. Names that leave the graph stay
    taken, which only changes the suffix a later name gets.

    What it cannot see is a name put into the graph some other way without appending a node (a new
    tensor named by hand on an existing node): hwnas names every new tensor and node with `unique_name`.
    """

    def __init__(self, graph: gs.Graph):
        self.nodes = graph.nodes
        self.scanned = 0
        self.taken: set[str] = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
        self.counters: dict[str, int] = {}

    def refresh(self, graph: gs.Graph) -> None:
        nodes = graph.nodes
        if len(nodes) < self.scanned:
            self.scanned = len(nodes)  # removed nodes' names stay taken; appends after this are scanned
        for node in nodes[self.scanned:]:
            self.taken.add(node.name)
            self.taken.update(t.name for t in node.inputs)
            self.taken.update(t.name for t in node.outputs)
        self.scanned = len(nodes)


def unique_name(graph: gs.Graph, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first name no node or tensor of the graph uses."""
    names = graph.__dict__.get("_hwnas_taken_names")
    if names is None or names.nodes is not graph.nodes:
        names = _TakenNames(graph)
        graph.__dict__["_hwnas_taken_names"] = names
    names.refresh(graph)
    name = base
    if name in names.taken:
        i = names.counters.get(base, 0) + 1
        while f"{base}_{i}" in names.taken:
            i += 1
        names.counters[base] = i
        name = f"{base}_{i}"
    names.taken.add(name)
    return name
