"""More int8 samples where a cpu profile's int8 half is thin: MobileNet-like first stages (stop 41's shipped half).

The int8 half's random "mobile" networks held one aligned stride-2 int8 3×3 depthwise conv with over 100k outputs,
and the trees put MobileNetV2's first depthwise convs (32-144 channels at 112²-56²) 11-42 % over their in-context
times (estimator-history.md, stop 40). This profiles networks of that family only — a 3×3 stem of stride 2, then
3-6 inverted bottlenecks (1×1 expand ×3-6, 3×3 depthwise, 1×1 project; 16-128 channels, multiples of 8 or 16) at
128-256 px inputs, quantized as the int8 half's networks are (`api.profiling_quantizer`: every second one padded to
multiples of 16 first; ReLU or ReLU6, which ORT runs inside the int8 conv) — one `profile_target` draw per seed,
and pools the samples of `--kinds` (default: the int8 depthwise convs) into BASE's int8 half (`profile_cpu.merged`,
draws 3, 4, ... after the two of `--int8-draws 2`). Every kernel of a network is timed and
counts in the draw's `measurements`; only the pooled ones are kept. Stop 41 pooled one draw of 110 kernels (the
rest of the 3,000-measurement budget) into stop 40's file (`git show d73526c:hwnas/estimator/data/estimators/cpu.json`):

    python benchmarks/studies/int8_stage_draws.py OUT_DIR --base STOP40/cpu.json --seeds 91 --budget 110
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pool_int8_draws import write  # noqa: E402
from profile_cpu import merged  # noqa: E402

from hwnas import api  # noqa: E402
from hwnas.estimator.estimator import LatencyEstimator  # noqa: E402
from hwnas.estimator.networks import BlockConfig, NetworkConfig, _channels  # noqa: E402
from hwnas.estimator.profile import profile_target  # noqa: E402
from hwnas.targets import get_target  # noqa: E402

FIRST_DRAW = 3  # after draws 1 and 2 of the shipped half (`pool_int8_draws.py`)
# MobileNetV2's: ORT runs them inside the int8 conv, so that a network's kernels are mostly its convs (a decomposed
# hard-swish is four int8 elementwise kernels more per conv, measurements the budget pays for)
ACTIVATIONS = ("relu", "relu6")


def mobile_stage(rng: np.random.Generator) -> NetworkConfig:
    """A MobileNet-like first stage: 3×3 stem of stride 2, then 3-6 inverted bottlenecks with 3×3 depthwise convs,
    stride 2 at four in ten while the map is at least 14 px; every channel count a multiple of 8 or 16 (the
    "aligned" layout's)."""
    size = int(rng.choice([128, 160, 192, 224, 256]))
    c = _channels(rng, 16, 48, "aligned")
    blocks = [BlockConfig("conv", c, 3, 2, act=str(rng.choice(ACTIVATIONS)))]
    h = size // 2
    for _ in range(int(rng.integers(3, 7))):
        stride = 2 if h >= 14 and rng.random() < 0.4 else 1
        c_out = _channels(rng, 16, 128, "aligned")
        residual = stride == 1 and c_out == c and rng.random() < 0.5
        hidden = _channels(rng, max(16, c * 3), max(16, c * 6), "aligned")
        blocks.append(BlockConfig("ibn", c_out, 3, stride, hidden=min(hidden, 768), act=str(rng.choice(ACTIVATIONS)),
                                  residual=residual))
        c, h = c_out, (h + 1) // stride if stride == 2 else h
    return NetworkConfig(3, size, tuple(blocks), seed=int(rng.integers(1 << 31)))


def pool(base: LatencyEstimator, draws: list[LatencyEstimator], kinds: set[str]) -> LatencyEstimator:
    """`base` with each draw's int8 samples of `kinds` pooled in, in order, as draws 3, 4, ... (`merged`)."""
    pooled = base
    for number, fresh in enumerate(draws, start=FIRST_DRAW):
        pooled = merged(pooled, fresh, lambda k: k.int8 and k.kind in kinds, "int8", draw=number)
    return pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--base", required=True, help="the cpu estimator the samples are pooled into")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="one draw per seed")
    parser.add_argument("--budget", type=int, default=200, help="kernels timed per draw (default 200)")
    parser.add_argument("--kinds", default="dwconv", help="kernel kinds kept, comma-separated (default: dwconv)")
    args = parser.parse_args()
    target, quantize, kinds = get_target("cpu"), api.profiling_quantizer(), set(args.kinds.split(","))
    draws = []
    for seed in args.seeds:
        fresh, report = profile_target(target, args.budget, seed=seed, quantize=quantize, int8_every=1, quiet_gate=True,
                                       network=mobile_stage)
        kept = sum(s.kernel.int8 and s.kernel.kind in kinds for s in fresh.samples_)
        print(f"seed {seed}: {report.measurements} kernels timed in {report.networks} networks, {kept} kept", flush=True)
        draws.append(fresh)
    write(pool(LatencyEstimator.load(args.base), draws, kinds), args.output)


if __name__ == "__main__":
    main()
