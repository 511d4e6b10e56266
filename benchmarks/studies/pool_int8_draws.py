"""A cpu estimator whose int8 half pools draws taken from different `--int8-draws` profiles (stop 40's shipped half).

`profile_cpu.py --int8-only FROM --int8-draws 2` takes its two draws back to back, so both land in whatever state this
VM's host is in for those minutes; on the 2-core EPYC a neighbour slows int8 models 12-15 % for minutes at a time
(estimator-history.md, stops 39-40). This writes FLOAT's float samples with draw N of each `--draw FILE:N`, in the
order given (the first as draw 1), each file an estimator written by `profile_cpu.py --int8-only ... --int8-draws 2`;
the profiling records follow the draws (`int8_profiling`, `int8_2_profiling`), refitted with the working tree's code.

    python benchmarks/studies/pool_int8_draws.py OUT_DIR --float FLOAT/cpu.json --draw A/cpu.json:1 --draw B/cpu.json:2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_cpu import merged  # noqa: E402

from hwnas.estimator.estimator import LatencyEstimator, Sample  # noqa: E402

RECORDS = ("int8_profiling", "int8_2_profiling")  # draw 1's and draw 2's, as profile_cpu.merged names them


def draw_samples(estimator: LatencyEstimator, draw: int) -> tuple[list[Sample], dict]:
    """The int8 samples of `estimator`'s draw `draw` (1 or 2), by the networks each draw's record says it began at."""
    first = estimator.target_config[RECORDS[0]]["networks_from"]
    second = estimator.target_config[RECORDS[1]]["networks_from"]
    low, high = (first, second) if draw == 1 else (second, None)
    chosen = [s for s in estimator.samples_ if s.kernel.int8 and s.network is not None and s.network >= low
              and (high is None or s.network < high)]
    return chosen, estimator.target_config[RECORDS[draw - 1]]


def _as_profile(like: LatencyEstimator, samples: list[Sample], config: dict) -> LatencyEstimator:
    return LatencyEstimator(like.target, like.parallelism_factor, like.rules, config, like.random_state,
                            like.kernel_offset_ms).fit(samples)


def pool(base: LatencyEstimator, draws: list[tuple[LatencyEstimator, int]]) -> LatencyEstimator:
    """`base`'s float samples with draw N of each (estimator, N) in `draws`, in order: each draw pooled as
    `profile_cpu.py --int8-draws` pools its own (`merged`: networks numbered after those before, the draw's record)."""
    if len(draws) != len(RECORDS):
        raise ValueError(f"{len(RECORDS)} draws, got {len(draws)}")
    pooled = _as_profile(base, [s for s in base.samples_ if not s.kernel.int8],
                         {k: v for k, v in base.target_config.items() if k not in RECORDS})
    for number, (estimator, draw) in enumerate(draws, start=1):
        chosen, record = draw_samples(estimator, draw)
        start = min(s.network for s in chosen)  # numbered from 0, as a fresh profile's networks are
        fresh = _as_profile(estimator, [dataclasses.replace(s, network=s.network - start) for s in chosen],
                            {"profiling": record, "machine": record.get("machine")})
        pooled = merged(pooled, fresh, lambda k: k.int8, "int8", draw=number)
    return pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--float", dest="float_json", required=True, help="the estimator whose float samples are kept")
    parser.add_argument("--draw", action="append", required=True, metavar="FILE:N", help="draw N (1 or 2) of FILE")
    args = parser.parse_args()
    if len(args.draw) != len(RECORDS):
        parser.error(f"give {len(RECORDS)} --draw")
    draws = [(LatencyEstimator.load(path), int(draw)) for path, _, draw in (spec.rpartition(":") for spec in args.draw)]
    write(pool(LatencyEstimator.load(args.float_json), draws), args.output)


def write(pooled: LatencyEstimator, output: Path) -> None:
    """Save a pooled estimator as OUTPUT/TARGET.json (and its fitted arrays) and say what it holds."""
    output.mkdir(parents=True, exist_ok=True)
    pooled.save(output / f"{pooled.target}.json")
    print(f"wrote {output / (pooled.target + '.json')}: {len(pooled.samples_)} samples "
          f"({sum(s.kernel.int8 for s in pooled.samples_)} int8)")


if __name__ == "__main__":
    main()
