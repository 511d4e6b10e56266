"""SCALE-Sim as a test oracle: conv layers in (JSON on stdin), compute cycles out (JSON on stdout).

Runs inside its own environment (`pip install scalesim "numpy<2.4"`; SCALE-Sim 3.0.0 crashes with
numpy ≥ 2.4), never imported by hwnas. Input, a list of jobs:

    [{"name": "pw33", "rows": 32, "cols": 32, "dataflow": "ws",
      "h": 28, "w": 28, "r": 1, "s": 1, "c": 33, "m": 33, "stride": 1, "pad": 0, "depthwise": false}]

Output, one object per job: {"name": ..., "total_cycles": [...], "stall_cycles": [...]}, one entry per
layer SCALE-Sim simulated. SCALE-Sim has no padding, and it rounds the output size up,
ceil((H − R + stride) / stride), where ONNX rounds down; so the oracle passes the padded rows and columns
the conv actually reads, (H_out − 1)·stride + R with H_out = floor((H + 2·pad − R) / stride) + 1. It has no
depthwise conv: its topology loader runs a layer whose name contains "DP" as C layers of one channel
and one filter each, one after another; the oracle builds those C layers the same way, in memory.
SCALE-Sim prints progress to stdout, so that is sent to stderr while it runs.
"""

from __future__ import annotations

import contextlib
import json
import sys

from scalesim.layout_utils import layouts
from scalesim.scale_config import scale_config
from scalesim.single_layer_sim import single_layer_sim
from scalesim.topology_utils import topologies


def config(rows: int, cols: int, dataflow: str) -> scale_config:
    c = scale_config()
    c.run_name = "hwnas-oracle"
    c.array_rows, c.array_cols = rows, cols
    c.df = dataflow
    c.ifmap_sz_kb = c.filter_sz_kb = c.ofmap_sz_kb = 64
    c.ifmap_offset, c.filter_offset, c.ofmap_offset = 0, 10_000_000, 20_000_000
    c.use_user_bandwidth = False  # SCALE-Sim estimates the bandwidth it needs: no memory stalls
    c.valid_conf_flag = True
    return c


def read_extent(padded: int, kernel: int, stride: int) -> int:
    """How much of a padded input dimension a conv reads (ONNX drops what the last window does not cover)."""
    out = (padded - kernel) // stride + 1
    return (out - 1) * stride + kernel


def topology(job: dict) -> topologies:
    """The layer(s) SCALE-Sim runs for one job: one layer, or C single-channel ones for a depthwise conv."""
    stride = job["stride"]
    h, w = (read_extent(job[dim] + 2 * job["pad"], job[kernel], stride) for dim, kernel in (("h", "r"), ("w", "s")))
    t = topologies()
    if job["depthwise"]:
        for channel in range(job["c"]):
            name = f"{job['name']}DPChannel_{channel}"
            t.load_layer_params_from_list(name, [name, h, w, job["r"], job["s"], 1, 1, stride, stride, 1, 1])
    else:
        name = job["name"]
        t.load_layer_params_from_list(name, [name, h, w, job["r"], job["s"], job["c"], job["m"], stride, stride, 1, 1])
    return t


def simulate(job: dict) -> dict:
    c, t = config(job["rows"], job["cols"], job["dataflow"]), topology(job)
    totals, stalls = [], []
    for layer_id in range(t.num_layers):
        sim = single_layer_sim()
        sim.set_params(layer_id=layer_id, config_obj=c, topology_obj=t, layout_obj=layouts(), verbose=False)
        sim.run()
        _, total, stall, *_ = sim.get_compute_report_items()
        totals.append(int(total))
        stalls.append(int(stall))
    return {"name": job["name"], "total_cycles": totals, "stall_cycles": stalls}


def main() -> None:
    jobs = json.load(sys.stdin)
    with contextlib.redirect_stdout(sys.stderr):
        results = [simulate(job) for job in jobs]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
