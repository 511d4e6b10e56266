"""Float samples where the square profiling networks never go: text lines (`networks.text_line_network`).

Every profiling network of `random_network` is square, while OCR direction classifiers and recognisers run on text
lines (48×192, 32×320, 48×320) and keep their width through (2, 1) strides, down to maps of 2-6 rows by 40-160
columns. On the 2-core Intel Xeon with AMX the shipped `cpu@xeon-amx.json` put PP-OCRv3 / v4 rec +19 / +23 % and the
PP-OCR classifier +51 % over their medians in every median set; in context the classifier's 5×5 depthwise convs on
3×96 maps came out at 2.5× their time, lifted by square samples of another cost regime. This profiles draws of
text-line networks (float only, `profile_target(network=text_line_network)`), pools their samples into BASE
(`profile_cpu.merged`, draws 2, 3, ...), and with `--drop N` takes whole float networks of BASE's, at random, until N
samples are gone, so that the pooled file stays within BASE's measurement budget:

    python benchmarks/studies/text_line_draws.py OUT_DIR --base hwnas/estimator/data/estimators/cpu@xeon-amx.json \\
        --seeds 101 --budget 300 --drop 300 --keep-level

`--keep-level`: the draw's times as measured, not scaled by the quiet gate's reference (`merged`): on 2026-12-07
the reference ran 1.26× its level at profile time while the pooled kernels had not slowed (scaled, every held-out
model fell 10-20 %). Findings: estimator-history.md, stop 43.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pool_int8_draws import write  # noqa: E402
from profile_cpu import merged  # noqa: E402

from hwnas.estimator.estimator import LatencyEstimator  # noqa: E402
from hwnas.estimator.networks import text_line_network  # noqa: E402
from hwnas.estimator.profile import profile_target  # noqa: E402
from hwnas.targets import get_target  # noqa: E402

FIRST_DRAW = 2


def without_float_networks(base: LatencyEstimator, samples: int, seed: int) -> LatencyEstimator:
    """`base` refitted without whole float networks drawn at random until at least `samples` samples are gone."""
    networks = collections.defaultdict(list)
    for s in base.samples_:
        networks[s.network].append(s)
    floats = sorted(n for n, group in networks.items() if n is not None and not any(s.kernel.int8 for s in group))
    np.random.default_rng(seed).shuffle(floats)
    dropped: set[int] = set()
    for n in floats:
        if sum(len(networks[d]) for d in dropped) >= samples:
            break
        dropped.add(n)
    return base.refitted([s for s in base.samples_ if s.network not in dropped])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--base", required=True, help="the cpu estimator the samples are pooled into")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="one draw per seed")
    parser.add_argument("--budget", type=int, default=300, help="kernels timed per draw (default 300)")
    parser.add_argument("--drop", type=int, default=0, help="samples of BASE's float networks to leave out (default 0)")
    parser.add_argument("--keep-level", action="store_true", help="pool the draws' times unscaled (see above)")
    args = parser.parse_args()
    pooled = LatencyEstimator.load(args.base)
    if args.drop:
        pooled = without_float_networks(pooled, args.drop, seed=args.seeds[0])
    for number, seed in enumerate(args.seeds, start=FIRST_DRAW):
        fresh, report = profile_target(get_target("cpu"), args.budget, seed=seed, quiet_gate=True,
                                       network=text_line_network)
        print(f"seed {seed}: {report.measurements} kernels timed in {report.networks} networks", flush=True)
        pooled = merged(pooled, fresh, lambda k: not k.int8, "text_line", draw=number, scale_level=not args.keep_level)
    write(pooled, args.output)


if __name__ == "__main__":
    main()
