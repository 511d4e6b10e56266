"""The npu target's compute cycles against SCALE-Sim itself, layer by layer.

SCALE-Sim runs in its own environment (it pins numpy < 2.4), through `tests/scalesim_oracle.py`:

    python -m venv .venv-sim && .venv-sim/bin/pip install scalesim "numpy<2.4"

or point HWNAS_SCALESIM_PYTHON at any python that imports scalesim. Without one, the test skips.
For every layer NpuTarget's compute cycles must equal the sum over the layers SCALE-Sim simulated
(C of them for a depthwise conv) of its "Total Cycles" + 1. The layers are small and compute-bound at
the default 64 DRAM bytes per cycle, which the test also asserts, so the full cost (roofline included)
is the compared number too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_kernels import conv_model

from hwnas.targets.kernels import decompose
from hwnas.targets.npu import NpuConfig, NpuTarget

ORACLE = Path(__file__).with_name("scalesim_oracle.py")
DEFAULT_SIM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-sim" / "bin" / "python"

# name, array (rows, cols), dataflow, H=W, R=S, C, M, stride, depthwise
LAYERS = [
    ("pw32-ws", (32, 32), "ws", 8, 1, 32, 32, 1, False),  # aligned: one fold
    ("pw33-ws", (32, 32), "ws", 8, 1, 33, 33, 1, False),  # just above: four folds
    ("pw33-28-ws", (32, 32), "ws", 28, 1, 33, 33, 1, False),  # DESIGN.md's 3,511-cycle example
    ("pw31-os", (32, 32), "os", 6, 1, 31, 33, 1, False),
    ("c3x3-ws", (16, 16), "ws", 10, 3, 20, 40, 1, False),
    ("c3x3s2-os", (16, 16), "os", 12, 3, 16, 17, 2, False),  # strided, one channel over the array
    ("c3x3-is", (16, 16), "is", 6, 3, 15, 31, 1, False),  # just below multiples
    ("c5x5-is", (32, 32), "is", 9, 5, 8, 33, 1, False),
    ("pw16-is", (16, 16), "is", 5, 1, 16, 16, 1, False),
    ("dw3x3-ws", (16, 16), "ws", 8, 3, 6, 6, 1, True),
    ("dw3x3s2-os", (32, 32), "os", 10, 3, 5, 5, 2, True),
    ("dw5x5-is", (16, 16), "is", 7, 5, 4, 4, 1, True),
]


def scalesim_python() -> str:
    candidates = [os.environ.get("HWNAS_SCALESIM_PYTHON"), sys.executable, str(DEFAULT_SIM_PYTHON)]
    for python in filter(None, candidates):
        probe = subprocess.run([python, "-c", "import scalesim"], capture_output=True) if Path(python).exists() else None
        if probe is not None and probe.returncode == 0:
            return python
    venv = DEFAULT_SIM_PYTHON.parent.parent
    pytest.skip(f"no python that imports scalesim: set HWNAS_SCALESIM_PYTHON or create {venv} (see the docstring)")


def oracle_jobs() -> list[dict]:
    return [
        {"name": name, "rows": rows, "cols": cols, "dataflow": df, "h": hw, "w": hw, "r": k, "s": k,
         "c": c, "m": m, "stride": stride, "pad": k // 2, "depthwise": dw}
        for name, (rows, cols), df, hw, k, c, m, stride, dw in LAYERS
    ]


def npu_cycles(
    rows: int, cols: int, dataflow: str, hw: int, k: int, c: int, m: int, stride: int, dw: bool
) -> tuple[int, int]:
    """(compute, full) cycles NpuTarget gives the same layer, built as an ONNX Conv."""
    target = NpuTarget(NpuConfig(rows=rows, cols=cols, dataflow=dataflow))
    (kernel,) = decompose(conv_model(hw, c, m, k=k, stride=stride, groups=c if dw else 1), {}, target.rules)
    assert kernel.kind == ("dwconv" if dw else "conv")
    return target.compute_cycles(kernel), target.kernel_cycles(kernel)


def test_npu_compute_cycles_match_scalesim():
    python = scalesim_python()
    run = subprocess.run(
        [python, str(ORACLE)], input=json.dumps(oracle_jobs()), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = {r["name"]: r for r in json.loads(run.stdout)}
    table, mismatches = [], []
    for name, (rows, cols), df, hw, k, c, m, stride, dw in LAYERS:
        sim = results[name]
        assert not any(sim["stall_cycles"]), f"{name}: SCALE-Sim stalled on memory"
        expected = sum(total + 1 for total in sim["total_cycles"])
        compute, full = npu_cycles(rows, cols, df, hw, k, c, m, stride, dw)
        table.append(f"{name:12s} {rows}x{cols} {df}  scalesim {sum(sim['total_cycles']):6d} "
                     f"({len(sim['total_cycles'])} layer(s))  npu {compute:6d}")
        if compute != expected or full != compute:
            mismatches.append(f"{name}: npu compute {compute}, full {full}; SCALE-Sim + 1 per layer {expected}")
    assert not mismatches, "\n".join(mismatches + table)
    print("\n".join(table), file=sys.stderr)
