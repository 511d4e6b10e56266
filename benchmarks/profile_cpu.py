"""Profile the `cpu` target and write its shipped estimator (and, with --detect-fusion, its fusion rules).

The `cpu` estimator is machine-specific: it fits the CPU, the ONNX Runtime build and the thread count it
was measured with, and its timings are only as good as the machine was quiet. Run this on an idle
machine (nothing else running; the 1-minute load average is checked against --max-load before and
reported after), 1 intra-op thread:

    python benchmarks/profile_cpu.py --detect-fusion               # rules + 3,000 measurements (~10 min)
    python benchmarks/profile_cpu.py --budget 3000 -o DIR          # elsewhere; pass --estimator DIR/cpu.json
    python benchmarks/profile_cpu.py --detect-fusion --int8        # + int8 kernels (every second network quantized)
    python benchmarks/profile_cpu.py --int8-only FROM/cpu.json -o DIR   # int8 kernels again, FROM's float ones kept
    python benchmarks/profile_cpu.py --int8-only FROM/cpu.json --int8-draws 2 -o DIR   # the same budget, two draws pooled
    python benchmarks/profile_cpu.py --int8 --replace-kinds resize --from FROM/cpu.json -o DIR   # FROM but its Resizes
    python benchmarks/profile_cpu.py -o DIR --rules RULES.json     # cut kernels by other rules than the target's
    python benchmarks/profile_cpu.py --int8 --text-lines 0.15 -o DIR   # a share of the networks on text lines

1. `--detect-fusion`: nn-Meter's pair test (`hwnas/estimator/cpu_fusion.py`) on `cpu`; prints the table
   and writes the rules to `hwnas/targets/data/fusion_cpu.json` (the `cpu` target's rules). The
   profiling below then cuts kernels by the rules just found.
2. Profiling (`hwnas/estimator/profile.py`, `context` mode unless `--mode kernel`): kernels measured
   inside random networks with ORT's per-node profiler, adaptive sampling, `--budget` kernel
   measurements; the estimator is written to `OUT/cpu.json` (+ `cpu.fitted.npz`), its `target_config`
   carrying a `machine` entry (CPU, cores, ORT version, date, load average during profiling).
3. int8 (`--int8`, `--int8-only`): the int8 networks are quantized by `hwnas.api.profiling_quantizer` (the
   quantize pass, every second network after align-channels to 16). `--int8-only FROM.json` profiles
   int8 networks only, `--budget` defaulting to FROM's int8 measurements, and writes FROM's float
   measurements with the new int8 ones: the float regressors stay as they were. `--int8-draws N` splits that
   budget over N profiles of consecutive seeds and pools them: each draw's int8 predictions sit at a level of its
   own (one draw's −8 % from another's on the same models, both scaled to FROM's level), and N of them average
   out. `--replace-kinds K... --from FROM.json` profiles as usual and keeps only its kernels of kinds K, with
   FROM's of every other kind (after the profiling vocabulary of those kinds changed: e.g. a Resize's
   interpolation, which older samples lack).
   The budget counts what FROM kept and everything the new run measured (`LABEL_profiling` in target_config).

Then measure its accuracy: `python benchmarks/estimator_accuracy.py --targets cpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from hwnas import api
from hwnas.errors import BadInputError
from hwnas.estimator.cpu_fusion import CRITERIA, detect_fusion_rules, load_average, markdown_table, rules_document
from hwnas.estimator.estimator import LatencyEstimator
from hwnas.estimator.profile import MODES, check_text_lines, profile_target, profiled_reference_ms
from hwnas.targets import get_target
from hwnas.targets.fusion_rules import FusionRules
from hwnas.targets.kernels import Kernel
from hwnas.targets.measure import environment

PACKAGE = Path(__file__).resolve().parents[1] / "hwnas"


def detect(target, criterion: str, out: Path) -> FusionRules:
    start = time.perf_counter()
    rules, measurements = detect_fusion_rules(target, criterion,
                                              progress=lambda m: print(f"  {m.pair} {m.size}: ratio {m.ratio:.2f}",
                                                                       file=sys.stderr, flush=True))
    load = load_average()
    print(f"Fusion pairs on {target.name} ({time.perf_counter() - start:.0f} s, load average {load}), criterion {criterion}:\n")
    print(markdown_table(measurements, criterion))
    print(f"\nrules: {json.dumps(rules.to_dict())}\n")
    document = rules_document(rules, measurements, target, criterion, load)
    try:
        FusionRules.from_dict(document)
    except BadInputError:  # this FusionRules does not accept the `measured` note: keep the rules loadable
        print(f"note: {out.name} gets the rules only; the measurement record goes to {out.stem}.measured.json",
              file=sys.stderr)
        Path(out.with_name(out.stem + ".measured.json")).write_text(json.dumps(document["measured"], indent=2) + "\n")
        document = rules.to_dict()
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {out}")
    return rules


def merged(base: LatencyEstimator, fresh: LatencyEstimator, replaced: Callable[[Kernel], bool], label: str,
           draw: int = 1, scale_level: bool = True) -> LatencyEstimator:
    """`base`'s measurements of the kernels `replaced` rejects and `fresh`'s of those it accepts (its networks
    numbered after base's), refitted; settings and per-kernel offset from `base`, `fresh`'s profiling record
    under `LABEL_profiling` (`--int8-only`: label int8, the int8 kernels; `--replace-kinds`: label kinds).
    A later `draw` of `--int8-draws` (2, 3...) pools: base's measurements of the accepted kernels stay too, and
    its record goes under `LABEL_DRAW_profiling`.

    `fresh`'s kernel times are scaled to the speed level `base` was profiled at (the quiet gate's reference
    level, where both recorded one): the estimate `--at-speed-now` scales holds one level for every kernel, and
    two profiles of one machine taken hours apart stood 0.132 and 0.138 ms apart. `scale_level=False` keeps `fresh`'s
    times as measured (the reference can move without the kernels: `benchmarks/studies/text_line_draws.py`)."""
    first = 1 + max((s.network for s in base.samples_ if s.network is not None), default=-1)
    base_level, fresh_level = profiled_reference_ms(base), profiled_reference_ms(fresh)
    to_base_level = base_level / fresh_level if scale_level and base_level and fresh_level else 1.0
    pooled = draw > 1
    samples = [s for s in base.samples_ if pooled or not replaced(s.kernel)] + [
        dataclasses.replace(s, latency_ms=s.latency_ms * to_base_level, network=None if s.network is None else s.network + first)
        for s in fresh.samples_ if replaced(s.kernel)]
    config = dict(base.target_config)
    around = sum(a["measurements"] for a in base.target_config.get("profiled_around", []))
    # what is kept of each run (the budget counts both): base's other kernels, fresh's replaced ones
    if not pooled:
        config["profiling"] = {**base.target_config.get("profiling", {}),
                               "base_kept": sum(not replaced(s.kernel) for s in base.samples_) - around}
    config[f"{label}_{draw}_profiling" if pooled else f"{label}_profiling"] = {
        **fresh.target_config.get("profiling", {}), "machine": fresh.target_config.get("machine"), "networks_from": first,
        "kept": sum(replaced(s.kernel) for s in fresh.samples_), "scaled_to_base_level": round(to_base_level, 4)}
    result = LatencyEstimator(base.target, base.parallelism_factor, base.rules, config, base.random_state,
                              base.kernel_offset_ms)
    return result.fit(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int,
                        help="kernel measurements (default 3000; with --int8-only, FROM_JSON's int8 measurements)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=MODES, default="context", help="how kernels are measured (default: context)")
    parser.add_argument("-o", "--output", default=str(PACKAGE / "estimator" / "data" / "estimators"), help="directory for cpu.json (default: the shipped one)")
    parser.add_argument("--detect-fusion", action="store_true", help="detect and write the fusion rules first")
    parser.add_argument("--criterion", choices=CRITERIA, default="latency_or_node",
                        help="fusion criterion (default latency_or_node: what context profiling needs)")
    parser.add_argument("--fusion-out", default=str(PACKAGE / "targets" / "data" / "fusion_cpu.json"))
    parser.add_argument("--rules", help="cut kernels by the fusion rules in this JSON file, not the target's")
    parser.add_argument("--max-load", type=float, default=1.0, help="refuse to start above this 1-minute load average")
    parser.add_argument("--force", action="store_true", help="measure even on a busy machine (the numbers will say so)")
    parser.add_argument("--int8", action="store_true",
                        help="also profile int8 kernels: every second network quantized by the quantize pass (cpu preset)")
    parser.add_argument("--int8-only", metavar="FROM_JSON",
                        help="profile int8 kernels only (every network quantized) and keep FROM_JSON's float measurements; "
                             "--budget defaults to FROM_JSON's int8 measurements")
    parser.add_argument("--int8-draws", type=int, default=1, metavar="N",
                        help="with --int8-only: N profiles of --budget/N measurements each (seeds --seed, --seed+1...), "
                             "pooled (default 1)")
    parser.add_argument("--text-lines", type=float, default=0.0, metavar="SHARE",
                        help="the share of the random networks drawn on text lines, as OCR models run (default 0)")
    parser.add_argument("--no-quiet-gate", action="store_true",
                        help="measure each network at once, without waiting out a neighbour's burst (hwnas/estimator/quiet.py)")
    parser.add_argument("--replace-kinds", nargs="+", metavar="KIND",
                        help="keep only the new profile's kernels of these kinds, and --from's of every other kind")
    parser.add_argument("--from", dest="from_json", metavar="FROM_JSON", help="the estimator --replace-kinds keeps kernels of")
    args = parser.parse_args()
    if bool(args.replace_kinds) != bool(args.from_json) or (args.replace_kinds and args.int8_only):
        print("error: --replace-kinds and --from go together, and not with --int8-only", file=sys.stderr)
        return 2
    try:
        check_text_lines(args.text_lines, args.mode)
    except ValueError as e:
        print(f"error: --text-lines: {e}", file=sys.stderr)
        return 2
    if args.int8_draws < 1 or (args.int8_draws > 1 and not args.int8_only):
        print("error: --int8-draws takes a count of at least 1, and goes with --int8-only", file=sys.stderr)
        return 2
    try:
        base = LatencyEstimator.load(args.int8_only or args.from_json) if args.int8_only or args.from_json else None
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.budget is None:
        args.budget = sum(s.kernel.int8 for s in base.samples_) if args.int8_only else 3000

    env = environment()
    load = load_average() or [float("nan")]
    print(f"{env['cpu']}, {env['logical_cpus']} logical CPUs, ONNX Runtime {env['onnxruntime']}; load average {load}")
    if load[0] > args.max_load and not args.force:
        print(f"error: load average {load[0]:.2f} > --max-load {args.max_load}: this machine is busy, timings would be "
              f"noise. Stop other work, or pass --force.", file=sys.stderr)
        return 2
    target = get_target("cpu")
    if args.detect_fusion:
        rules = detect(target, args.criterion, Path(args.fusion_out))
    else:
        rules = FusionRules.from_json(args.rules) if args.rules else target.rules

    start = time.perf_counter()
    draws, measurements, networks = args.int8_draws if args.int8_only else 1, 0, 0
    for draw in range(draws):
        with tqdm(total=args.budget // draws, desc=f"profiling cpu ({args.mode})" + (f", draw {draw + 1} of {draws}" if draws > 1 else ""),
                  unit="kernel") as bar:
            fresh, report = profile_target(target, args.budget // draws, seed=args.seed + draw, mode=args.mode, rules=rules,
                                           progress=bar.update,
                                           quantize=api.profiling_quantizer() if args.int8 or args.int8_only else None,
                                           int8_every=1 if args.int8_only else 2, quiet_gate=not args.no_quiet_gate,
                                           text_lines=args.text_lines)
        measurements, networks = measurements + report.measurements, networks + report.networks
        if args.int8_only:  # each draw's level is the machine's of its minutes: pooled, they average out
            base = merged(base, fresh, lambda k: k.int8, "int8", draw=draw + 1)
    machine = fresh.target_config.get("machine", {})
    profiling = fresh.target_config.get("profiling")
    if args.int8_only:
        estimator = base
    elif base is not None:
        estimator = merged(base, fresh, lambda k: k.kind in args.replace_kinds, "kinds")
    else:
        estimator = fresh
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{estimator.target}.json"
    estimator.save(path)
    print(f"wrote {path}: {measurements} kernel measurements"
          + (f" from {networks} networks" if networks else "")
          + (f" (int8; with {args.int8_only}'s {sum(not x.kernel.int8 for x in estimator.samples_)} float ones)"
             if args.int8_only else "")
          + (f" (kept: {', '.join(args.replace_kinds)}; every other kind's from {args.from_json})" if args.from_json else "")
          + f" in {time.perf_counter() - start:.0f} s; load average during profiling {machine.get('load_average_1min')}")
    print(f"profiling: {json.dumps(profiling)}")
    if report.rounds:
        print("adaptive rounds (each: neighbours of the worst-fitted kernels, scored before they join the fit, so high "
              "by design; the accuracy on models: benchmarks/estimator_accuracy.py):")
    for i, r in enumerate(report.rounds):
        print(f"  round {i + 1}: {r['measured']} new kernels, error before refit: MAPE {r['mape_before_fit']:.1%}, "
              f"within ±5 % {r['within_5pct_before_fit']:.0%}")
    busiest = (machine.get("load_average_1min") or {}).get("max", 0.0)
    if busiest > args.max_load + 1:  # + 1: the profiling process itself keeps one core busy
        print(f"warning: the load average reached {busiest:.2f} while profiling (this process adds ~1): "
              f"other work was running; do not ship these numbers", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
