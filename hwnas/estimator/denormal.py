"""What a weight-side denormal costs on this machine: one probe, timed when a measured target is profiled.

A vector multiply-add that reads a denormal (subnormal) float takes a microcode assist on CPUs that do not treat
denormals as zero, and ORT's CPU kernels run a 1-thread session on the caller's thread, where its
`session.set_denormal_as_zero` option does not reach. What an assist costs is the CPU's (tens of ns on an
Intel Xeon, nothing on an AMD EPYC; benchmarks/studies/estimator-history.md), and no feature of a kernel's
shape shows it, so the estimator adds it as a physical term: `kernels.denormal_uses` counts the assisted
instructions, this probe prices one.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hwnas.targets.base import Target
from hwnas.targets.kernels import decompose, denormal_uses
from hwnas.targets.measure import measure_interleaved

# a 1x1 conv as the detectors' slow ones: 192 -> 384 channels at 30x30
_C_IN, _C_OUT, _SIDE = 192, 384, 30


def _probe(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "denormal_probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, _C_IN, _SIDE, _SIDE])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, _C_OUT, _SIDE, _SIDE])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def measure_assist_ns(target: Target, seed: int = 0) -> float:
    """ns per weight-vector read that holds a denormal on a measured target (`cpu`, `ort:`): the probe conv with
    one denormal in every 8th vector of the target's parallelism factor of output channels against the same
    conv without, interleaved; 0 where the difference is noise."""
    lanes = target.parallelism_factor
    rng = np.random.default_rng(seed)
    clean = (rng.standard_normal((_C_OUT, _C_IN, 1, 1)) * 0.05).astype(np.float32)
    with_denormals = clean.copy()
    with_denormals[::lanes * 8, :, 0, 0] = np.float32(1e-40)  # the first output channel of every 8th block
    models = {"clean": _probe(clean), "denormal": _probe(with_denormals)}
    shapes = {"x": (1, _C_IN, _SIDE, _SIDE)}
    times = measure_interleaved(models, shapes, target.settings, tuple(target.providers))
    kernels = decompose(models["denormal"], shapes, target.rules)
    uses = sum(denormal_uses(models["denormal"], kernels, lanes).values())
    extra_ms = times["denormal"].latency_ms - times["clean"].latency_ms
    # below a fifth of the clean conv's time the difference is the machine's noise, not assists
    return 0.0 if extra_ms < 0.2 * times["clean"].latency_ms else round(extra_ms * 1e6 / uses, 2)
