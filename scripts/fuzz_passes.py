#!/usr/bin/env python3
"""Fuzz every exact pass (each option set) and the exact pipelines on N random CNNs.

    python scripts/fuzz_passes.py --graphs 1000 [--seed S] [--jobs J] [--passes SPEC;SPEC...]

Graph i is `tests.strategies.generate(S + i)`; every exact pass variant and pipeline from
`tests/strategies.py` runs on it through `hwnas.api.run` with verification. Prints progress, a
summary table (graphs, pass runs, verified, skipped-no-site, mismatches, crashes) per pass and in
total, then one line per failure with the seed and the pass, and how to reproduce it. Exit code 1 on
any mismatch or crash, 0 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STATUSES = ("verified", "no-site", "mismatch", "crash")


def _fuzz_one(job: tuple[int, tuple[str, ...]]) -> tuple[int, list[tuple[str, str, str, int]]]:
    """Run every spec on graph `seed`: (seed, [(spec, status, detail, sites)])."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tests.strategies import RunOutcome, generate, run_exact

    seed, specs = job
    try:
        model = generate(seed)
    except Exception as e:  # noqa: BLE001  (a generator bug: report it, keep fuzzing)
        return seed, [("<generate>", "crash", f"{type(e).__name__}: {e}", 0)]
    results = []
    for spec in specs:
        try:
            outcome = run_exact(model, spec)
        except Exception as e:  # noqa: BLE001  (run_exact classifies; this is a last resort)
            outcome = RunOutcome("crash", f"{type(e).__name__}: {e}")
        results.append((spec, outcome.status, outcome.detail, outcome.sites))
    return seed, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1].strip())
    parser.add_argument("--graphs", type=int, required=True, help="number of random graphs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first graph (graph i has seed S+i)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--passes", help="only these specs, separated by ';' (default: every exact pass and pipeline)")
    parser.add_argument("--save-failures", metavar="DIR", help="write each failing graph to DIR/seed<N>.onnx")
    args = parser.parse_args(argv)
    if args.graphs < 1 or args.jobs < 1:
        parser.error("--graphs and --jobs must be >= 1")

    from tests.strategies import exact_pipelines, exact_specs, pass_variants

    if args.passes:
        from hwnas.errors import BadInputError
        from hwnas.passes import parse_pipeline

        specs = tuple(s for s in args.passes.split(";") if s)
        for spec in specs:
            try:
                parse_pipeline(spec)
            except BadInputError as e:
                parser.error(str(e))
    else:
        specs = tuple(exact_specs() + exact_pipelines())
    rejected = [v for v in pass_variants() if v.exact is None]
    print(f"fuzzing {len(specs)} exact passes/pipelines on {args.graphs} graphs (seeds {args.seed}.."
          f"{args.seed + args.graphs - 1}) with {args.jobs} workers", flush=True)  # fmt: skip
    for spec in specs:
        print(f"  {spec}")
    for v in rejected:
        print(f"  (not run: {v.spec}: {v.problem})")

    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(STATUSES, 0))
    sites: dict[str, int] = defaultdict(int)
    failures: list[tuple[int, str, str, str]] = []
    jobs = [(seed, specs) for seed in range(args.seed, args.seed + args.graphs)]
    start = time.perf_counter()
    done = 0
    step = max(1, args.graphs // 20)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for seed, results in pool.imap_unordered(_fuzz_one, jobs, chunksize=1):
            done += 1
            for spec, status, detail, n in results:
                counts[spec][status] += 1
                sites[spec] += n
                if status in ("mismatch", "crash"):
                    failures.append((seed, spec, status, detail))
                    first = detail.splitlines()[0] if detail else ""
                    print(f"  FAIL seed {seed} {spec}: {status}: {first}", flush=True)
            if done % step == 0 or done == args.graphs:
                elapsed = time.perf_counter() - start
                print(f"[{done}/{args.graphs}] {elapsed:.0f}s, {len(failures)} failures", flush=True)

    print()
    print(summary_table(args.graphs, specs, counts, sites))
    print(f"\nwall time {time.perf_counter() - start:.0f}s")
    if failures:
        print(f"\n{len(failures)} failures; reproduce one with")
        print("  python scripts/fuzz_passes.py --graphs 1 --seed SEED --passes 'SPEC' [--save-failures DIR]")
        for seed, spec, status, detail in sorted(failures):
            print(f"  seed {seed}  {spec}  {status}: {detail}")
        if args.save_failures:
            save_graphs(Path(args.save_failures), sorted({seed for seed, *_ in failures}))
        return 1
    return 0


def save_graphs(folder: Path, seeds: list[int]) -> None:
    import onnx

    from tests.strategies import describe, generate

    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        model = generate(seed)
        onnx.save(model, folder / f"seed{seed}.onnx")
        (folder / f"seed{seed}.txt").write_text(describe(model) + "\n")
    print(f"wrote {len(seeds)} failing graphs (.onnx and .txt) to {folder}")


def summary_table(graphs: int, specs: tuple[str, ...], counts: dict, sites: dict) -> str:
    header = ("pass / pipeline", "graphs", "pass runs", "verified", "skipped-no-site", "mismatches", "crashes", "sites")
    rows = []
    total = dict.fromkeys(STATUSES, 0)
    for spec in specs:
        c = counts[spec]
        for k in STATUSES:
            total[k] += c[k]
        runs = sum(c.values())
        rows.append((spec, graphs, runs, c["verified"], c["no-site"], c["mismatch"], c["crash"], sites[spec]))
    if "<generate>" in counts:  # the generator itself failed on some seeds
        rows.append(("<generate>", graphs, counts["<generate>"]["crash"], 0, 0, 0, counts["<generate>"]["crash"], 0))
    rows.append(("TOTAL", graphs, sum(total.values()), total["verified"], total["no-site"], total["mismatch"],
                 total["crash"], sum(sites.values())))  # fmt: skip
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row) -> str:
        return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


if __name__ == "__main__":
    sys.exit(main())
