"""Command line: parses arguments, calls hwnas.api, prints. No logic lives here.

Exit codes: 0 success, 1 a check failed (verification, budget), 2 usage error or bad input (one line
on stderr, nothing written), 3 internal error (a bug: please report it; HWNAS_DEBUG=1 shows the trace).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version

from hwnas import api
from hwnas.errors import BadInputError, HwnasError
from hwnas.graph.io import check_output_path, save_model
from hwnas.graph.shapes import parse_input_shapes
from hwnas.report.json_report import dumps, write_json
from hwnas.search.recipe import full_pipeline, load_recipe
from hwnas.verify import Tolerance, load_calibration


DEFAULT_TRIALS, DEFAULT_TIME_BUDGET = 300, 50.0  # optimize: a search that ends within a minute on 2 cores


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other bad input
        raise BadInputError(f"{self.prog}: {message}")


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:DxDxD",
                   help="concrete shape for a dynamic input, for analysis and verification only (repeatable)")


def _command(sub, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A subcommand: `summary` is its line in `hwnas --help`, and its own --help ends with `example`
    (tests/test_cli.py checks that every command has one)."""
    return sub.add_parser(name, help=summary, description=summary, epilog=f"example: {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hwnas", description="Accelerator-aware optimizer for trained ONNX models.",
                     epilog="'hwnas COMMAND --help' shows a command's options and an example.",
                     formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=14, width=100))
    parser.add_argument("--version", action="version", version=f"hwnas {version('hwnas')}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, title="commands", metavar="COMMAND")

    p = _command(sub, "passes", "list the passes with their options and exactness class", "hwnas passes --json")
    p.add_argument("--json", action="store_true", help="print JSON only")

    zoo = _command(sub, "zoo", "list or export the built-in reference models", "hwnas zoo export ibn-detector -o detector.onnx")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    _command(zsub, "list", "list the zoo models with MACs, params and block counts", "hwnas zoo list")
    zexp = _command(zsub, "export", "write a zoo model as ONNX", "hwnas zoo export mobilenetv2 --width 0.5 --resolution 160 -o mbv2.onnx")
    zexp.add_argument("name")
    zexp.add_argument("-o", "--output", required=True)
    zexp.add_argument("--width", type=float, default=1.0, help="width (depth) multiplier (default 1.0)")
    zexp.add_argument("--resolution", type=int, default=None, help="input resolution (default: the model's)")
    zexp.add_argument("--divisor", type=int, default=8, help="round channel counts to this (1 = unrounded)")
    zexp.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")

    r = _command(sub, "run", "apply a pass pipeline, verify it in ONNX Runtime, write the model",
                 "hwnas run detector.onnx -o detector.fold.onnx --passes fold-bn,fold-constants")
    r.add_argument("input")
    r.add_argument("-o", "--output")
    r.add_argument("--passes", help="pipeline, e.g. 'fold-bn,fold-constants'")
    r.add_argument("--recipe", help="a recipe from 'hwnas optimize --recipe-out' (replayed, or transferred to this model)")
    _add_shape_args(r)
    r.add_argument("--calib", help="calibration inputs (.npz, one array per input, samples first): fits use the first "
                   "three quarters, drift is judged on the held-back rest")
    r.add_argument("--holdout", metavar="NPZ", help="held-out inputs (.npz): a result that is not exact also gets "
                   "its drift on them (cosine, max abs, top-1 agreement)")
    r.add_argument("--rtol", type=float, default=Tolerance.rtol, help=f"relative tolerance (default {Tolerance.rtol:g})")
    r.add_argument("--atol", type=float, default=Tolerance.atol, help=f"absolute tolerance (default {Tolerance.atol:g})")
    r.add_argument("--allow-drift", type=float, default=None, metavar="X",
                   help="accept a reconstructed pipeline whose output cosine is >= 1 - X")
    r.add_argument("--disable-pass", action="append", default=[], metavar="NAME", help="skip this pass (repeatable)")
    r.add_argument("--no-verify", action="store_true", help="write without checking in ONNX Runtime (warns)")
    r.add_argument("--verify-each", action="store_true", help="verify after every pass (slower; pins the culprit)")
    r.add_argument("--report", help="write a JSON report here")
    r.add_argument("--dry-run", action="store_true", help="list the sites each pass would rewrite and why others are skipped")
    r.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    r.add_argument("--seed", type=int, default=0)

    e = _command(sub, "estimate", "estimated latency per kernel, params and peak memory on a target",
                 "hwnas estimate detector.onnx --target npu-32x32")
    e.add_argument("input")
    e.add_argument("--target", required=True, help="cpu, cpu:threads=N, npu-32x32, npu-16x16, NPU.json, ort:<EP>, cmd:<...>")
    _add_shape_args(e)
    e.add_argument("--estimator", help="an estimator file from 'hwnas profile' (default: the one shipped for the target)")
    e.add_argument("--measure", action="store_true", help="also measure the model on the target, for comparison")
    e.add_argument("--at-speed-now", action="store_true",
                   help="measured targets: scale the estimate by how much faster or slower this machine runs now than "
                        "while the estimator was profiled (a small reference model, ~0.1 s; a shared VM's host moves "
                        "its speed by up to 1.5x)")
    e.add_argument("--top", type=int, default=15, help="kernels to list (default 15)")
    e.add_argument("--json", action="store_true", help="print JSON only")

    o = _command(sub, "optimize", "search pass sequences for the fastest verified model on a target",
                 "hwnas optimize detector.onnx -o detector.opt.onnx --target npu-32x32 --report detector.html")
    o.add_argument("input")
    o.add_argument("-o", "--output", required=True)
    o.add_argument("--target", required=True)
    mode = o.add_mutually_exclusive_group()
    mode.add_argument("--exact", action="store_true", help="only exact passes (the default)")
    mode.add_argument("--max-drift", type=float, metavar="X", help="allow reconstructed passes while output cosine >= 1 - X")
    o.add_argument("--calib", help="calibration inputs (.npz) for reconstructed passes (the first three quarters) "
                   "and drift (the held-back last quarter)")
    o.add_argument("--holdout", metavar="NPZ", help="held-out inputs (.npz, never used by the search): the chosen "
                   "model's drift on them (cosine, top-1 agreement) goes into the report")
    o.add_argument("--quantize", choices=("int8",), help="score every candidate as the int8 model it becomes and write "
                   "the winner quantized (ONNX Runtime's quantizer; needs --max-drift, best with --calib; over --max-drift "
                   "the input side of the graph stays float)")
    o.add_argument("--quantize-preset", choices=("cpu", "qnn", "npu"),
                   help="the quantized form (default: the target's; docs/quantization.md)")
    o.add_argument("--deploy-check", choices=("qnn-htp",),
                   help="compile the int8 winner on Qualcomm's HTP backend (needs onnxruntime-qnn); one that does "
                        "not compile with every node on the NPU is passed over for the next (docs/targets.md)")
    _add_shape_args(o)
    o.add_argument("--algorithm", default="evolution",
                   help="evolution (default), random, greedy, or zero-shot (for models you will train: "
                        "evolution scored by the NASWOT trainability proxy)")
    o.add_argument("--space", default="curated", help="curated (default: PF-aligned choices) or uncurated")
    o.add_argument("--trials", type=int, help=f"candidates to evaluate (default {DEFAULT_TRIALS}; with neither "
                   f"--trials nor --time-budget the search also stops after {DEFAULT_TIME_BUDGET:g} s)")
    o.add_argument("--time-budget", type=float, metavar="S", help="stop the search after S seconds (within one candidate's time)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                   help="evaluation processes (default auto: one per core); with --storage, 0 starts none and "
                        "waits for 'hwnas worker' processes (docs/distributed.md)")
    o.add_argument("--storage", metavar="URL",
                   help="evaluate through an Optuna RDB storage (an SQLAlchemy URL: sqlite:///search.db, postgresql://...)")
    o.add_argument("--evaluate-cmd", metavar="'CMD {model}'",
                   help="score each candidate with this command (last number printed, higher is better, e.g. "
                        "accuracy after fine-tuning); run without a shell")
    o.add_argument("--evaluate-timeout", type=float, default=3600.0, metavar="S", help="per candidate (default 3600)")
    o.add_argument("--quality-tolerance", type=float, default=0.01, metavar="X",
                   help="zero-shot / --evaluate-cmd: a candidate may score at most X of the original's score below it "
                        "(default 0.01)")
    o.add_argument("--memory-budget", metavar="SIZE", help="params + peak activations, e.g. 4MB, 3.5MiB")
    o.add_argument("--max-params", metavar="SIZE")
    o.add_argument("--max-peak-act", metavar="SIZE")
    o.add_argument("--estimator", help="an estimator file from 'hwnas profile' (default: the shipped one)")
    o.add_argument("--report", help="write the report here (.json or .html)")
    o.add_argument("--recipe-out", help="write the recipe (JSON) here")
    o.add_argument("--journal", help="score journal for resuming (default: OUTPUT.search.jsonl)")
    o.add_argument("--no-verify", action="store_true", help="write without checking in ONNX Runtime (warns)")
    o.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    o.add_argument("--quiet", action="store_true", help="no progress bar")

    h = _command(sub, "hints", "per-layer advice: what to regroup, fuse or align, and the saving",
                 "hwnas hints detector.onnx --target npu-32x32")
    h.add_argument("input")
    h.add_argument("--target", required=True, help="cpu, npu-32x32, npu-16x16, NPU.json, ort:<EP>, cmd:<...>")
    _add_shape_args(h)
    h.add_argument("--estimator", help="an estimator file from 'hwnas profile' (default: the one shipped for the target)")
    h.add_argument("--json", action="store_true", help="print JSON only")

    c = _command(sub, "check", "CI gate: latency, memory and channel budgets (exit 1 if one fails)",
                 "hwnas check detector.onnx --target npu-32x32 --max-latency-ms 12 --max-params 4MB\n"
                 "  hwnas check m.int8.onnx --target qnn-htp --require-npu --max-drift 0.02 --reference m.onnx --holdout held.npz")
    c.add_argument("input")
    c.add_argument("--target", required=True, help="cpu, npu-32x32, npu-16x16, NPU.json, ort:<EP>, cmd:<...>, qnn-htp")
    c.add_argument("--max-latency-ms", type=float, metavar="X", help="estimated latency on the target at most X ms")
    c.add_argument("--max-params", metavar="SIZE", help="parameter bytes at most SIZE (bytes, 512KB, 4MB, 3.5MiB)")
    c.add_argument("--max-peak-act", metavar="SIZE", help="peak activation bytes at most SIZE")
    c.add_argument("--require-multiple", type=int, metavar="N", help="every Conv's input/output channel count a multiple of N")
    c.add_argument("--baseline", metavar="REF.onnx", help="reference model for --max-regression")
    c.add_argument("--max-regression", type=float, metavar="PCT", help="estimated latency at most PCT %% above the baseline's")
    c.add_argument("--require-npu", action="store_true",
                   help="qnn-htp: the model compiles for the NPU with every node on it (needs onnxruntime-qnn)")
    c.add_argument("--max-drift", type=float, metavar="X", help="qnn-htp: the NPU's output cosine >= 1 - X")
    c.add_argument("--reference", metavar="FLOAT.onnx", help="qnn-htp: the float model --max-drift compares with "
                   "(default: the same model on ORT's CPU)")
    c.add_argument("--calib", help="qnn-htp: inputs (.npz) to measure the NPU's drift on")
    c.add_argument("--holdout", help="qnn-htp: held-out inputs (.npz) to measure the drift on (preferred over --calib)")
    c.add_argument("--junit", metavar="FILE", help="write JUnit XML here (one test case per budget)")
    _add_shape_args(c)
    c.add_argument("--estimator", help="an estimator file from 'hwnas profile' (default: the one shipped for the target)")
    c.add_argument("--json", action="store_true", help="print JSON only")

    w = _command(sub, "worker", "join a search run with --storage: evaluate its candidates until it ends",
                 "hwnas worker --storage postgresql://hwnas@db-host/hwnas")
    w.add_argument("--storage", required=True, metavar="URL", help="the coordinator's --storage URL")
    w.add_argument("--study", metavar="NAME", help="the search to join (default: the newest still running, waited for)")
    w.add_argument("--once", action="store_true", help="leave when no candidate is waiting instead of waiting for more")
    w.add_argument("--max-candidates", type=int, metavar="N", help="leave after evaluating N candidates")
    w.add_argument("--evaluate-cmd", metavar="'CMD {model}'",
                   help="the search's --evaluate-cmd, repeated to allow it to run here (required to join such a search)")
    w.add_argument("--quiet", action="store_true", help="no line per candidate")

    pr = _command(sub, "profile", "measure sampled kernels on a target and fit its latency estimator",
                  "hwnas profile --target cpu --budget 2000 -o estimators/\n"
                  "  hwnas profile --target cpu --around model.onnx --budget 200 -o estimators/")
    pr.add_argument("--target", required=True)
    pr.add_argument("--budget", type=int, default=None,
                    help="kernel measurements (default 2000; with --around 200)")
    pr.add_argument("--around", metavar="MODEL", help="refit the estimator (the shipped one, or --estimator) with "
                    "MODEL's own kernels timed in context (measured targets) and --budget samples shaped like its "
                    "kernels outside the profiled distribution or estimated more than 25 %% off their time in MODEL")
    pr.add_argument("--estimator", help="with --around: the estimator file to extend (default: the shipped one)")
    _add_shape_args(pr)  # with --around: MODEL's dynamic inputs
    pr.add_argument("-o", "--output", required=True, help="directory for <target>.json (+ .fitted.npz)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--int8", action="store_true",
                    help="also profile int8 kernels: every second network quantized (QDQ, cpu preset; half of those "
                         "aligned to 16 channels first); cpu targets only")
    pr.add_argument("--no-quiet-gate", action="store_true",
                    help="cpu targets: measure each profiling network at once instead of first waiting out a "
                         "neighbour's burst on a shared machine (a small reference model timed before and after)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _workers(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _fmt_int(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _ratio(before: int | None, after: int | None) -> str:
    if not before or after is None:
        return ""
    return f"{(after - before) / before * 100:+.1f}%"


def _print_run(result: api.RunResult) -> None:
    b, a = result.baseline, result.optimized
    flops = lambda s: None if s.macs is None else 2 * s.macs  # noqa: E731
    rows = [("nodes", b.nodes, a.nodes), ("params", b.params, a.params), ("FLOPs (2·MACs)", flops(b), flops(a))]
    print(f"{'':16}{'before':>16}{'after':>16}{'change':>10}")
    for name, x, y in rows:
        print(f"{name:16}{_fmt_int(x):>16}{_fmt_int(y):>16}{_ratio(x, y):>10}")
    print()
    for rec in result.records:
        applicable = sum(s.applicable for s in rec.sites)
        print(f"{rec.spec}: {rec.exactness.value}, {len(rec.applied)}/{applicable} sites rewritten, "
              f"{len(rec.skipped)} skipped, nodes {rec.nodes_before}->{rec.nodes_after}, {rec.seconds * 1000:.0f} ms")
    if result.verification is not None:
        v = result.verification
        sizes = ", ".join("x".join(map(str, next(iter(s.values())))) for s in v.input_shapes)
        if result.exactness is api.Exactness.EXACT:
            verdict = "equivalent" if v.equivalent else "NOT equivalent"
        else:
            verdict = f"{result.exactness.value}, within the drift budget"
        print(f"verification: {verdict} (max abs {v.max_abs:.3g}, cosine {v.cosine:.8f}; inputs {sizes})")
    for data, fidelity in result.drift.items():
        samples = min(o.samples for o in fidelity.outputs)
        for o in fidelity.outputs:
            top1 = "" if o.top1_agreement is None else f", top-1 agreement {o.top1_agreement:.3f}"
            print(f"drift on {data} ({samples} samples), output {o.name}: cosine {o.cosine:.6f} "
                  f"(worst sample {o.min_sample_cosine:.6f}), max abs {o.max_abs:.3g}{top1}")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)


def _print_dry_run(result: api.RunResult) -> None:
    for rec in result.records:
        print(f"{rec.spec} ({rec.exactness.value}):")
        index = 0
        for site in rec.sites:
            if site.applicable:
                chosen = "rewrite" if site in rec.applied else "not selected"
                print(f"  [{index}] {site.description}: {chosen}")
                index += 1
            else:
                print(f"  [-] {site.description}: skipped: {site.reason}")


def cmd_passes(args) -> int:
    from hwnas.passes import all_passes

    items = [
        {"name": name, "exactness": cls.exactness_doc(), "summary": cls.summary, "options": cls.option_docs()}
        for name, cls in all_passes().items()
    ]
    if args.json:
        print(json.dumps(items, indent=2, default=str))
        return 0
    for item in items:
        print(f"{item['name']:22} [{item['exactness']}] {item['summary']}")
        for opt in item["options"]:
            choices = f" (one of {', '.join(map(str, opt['choices']))})" if opt["choices"] else ""
            print(f"{'':24}{opt['name']}={opt['default']}{choices}: {opt['help']}")
        print(f"{'':24}sites=SELECTOR: restrict to applicable sites by index (N, A:B, N;A:B)")
    return 0


def cmd_zoo(args) -> int:
    from hwnas import models

    if args.zoo_command == "list":
        print(f"{'name':14}{'resolution':>11}{'MACs':>16}{'params':>13}{'blocks':>8}{'IBN':>6}  description")
        for name in models.ZOO_NAMES:
            spec, info = models.SPECS[name], models.zoo_info(name)
            print(f"{name:14}{spec.default_resolution:>11}{info.macs:>16,}{info.params:>13,}{info.blocks:>8}"
                  f"{info.ibn_blocks:>6}  {spec.description}")
        return 0
    check_output_path(args.output)
    try:
        model = models.build(args.name, width=args.width, resolution=args.resolution, divisor=args.divisor, seed=args.seed)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    save_model(model, args.output)
    info = models.zoo_info(args.name, width=args.width, resolution=args.resolution, divisor=args.divisor)
    print(f"wrote {args.output}: {args.name}, {info.macs:,} MACs, {info.params:,} params")
    return 0


def cmd_run(args) -> int:
    if bool(args.passes) == bool(args.recipe):
        raise BadInputError("run: give either --passes PIPELINE or --recipe R.json")
    if not args.dry_run and not args.output:
        raise BadInputError("run: give -o OUTPUT (or --dry-run)")
    if args.output:
        check_output_path(args.output)
    if args.report:
        check_output_path(args.report)
    model = api.as_model(args.input)
    calibration = load_calibration(args.calib, model) if args.calib else None
    holdout = load_calibration(args.holdout, model) if args.holdout else None
    shapes = parse_input_shapes(args.input_shape)
    pipeline = args.passes or api.recipe_pipeline(model, load_recipe(args.recipe), shapes)
    result = api.run(
        model,
        pipeline,
        input_shapes=shapes,
        calibration=calibration,
        holdout=holdout,
        tolerance=Tolerance(atol=args.atol, rtol=args.rtol),
        allow_drift=args.allow_drift,
        disabled=args.disable_pass,
        verify=not args.no_verify,
        verify_each=args.verify_each,
        dry_run=args.dry_run,
        seed=args.seed,
        strict_sites=bool(args.passes),  # a transferred recipe may name sites this model lacks
    )
    if args.dry_run:
        _print_dry_run(result)
        return 0
    save_model(result.model, args.output)
    report = {"input": str(args.input), "output": str(args.output), **result.to_dict()}
    if args.report:
        write_json(args.report, report)
    if args.json:
        print(dumps(report))
    else:
        _print_run(result)
        print(f"wrote {args.output}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


def cmd_estimate(args) -> int:
    result = api.estimate(args.input, args.target, input_shapes=parse_input_shapes(args.input_shape),
                          estimator=args.estimator, measure=args.measure, at_speed_now=args.at_speed_now)
    if args.json:
        print(dumps(result.to_dict()))
        return 0
    cycles = f" ({result.cycles:,} cycles)" if result.cycles is not None else ""
    print(f"target {result.target['name']}: estimated latency {result.latency_ms:.4f} ms{cycles}")
    if result.speed is not None:
        print(f"at this machine's speed now: {result.speed.scale:.2f}x the profile's times (reference model "
              f"{result.speed.now_ms:.3f} ms now, {result.speed.profiled_ms:.3f} ms while profiled)")
    if result.measured_ms is not None:
        print(f"measured on the target: {result.measured_ms:.4f} ms")
    print(f"params {_size(result.params_bytes)}, peak activations {_size(result.peak_activation_bytes)} "
          f"(at {result.memory.peak.node})")
    ranked = sorted(result.kernels, key=lambda k: -k.latency_ms)[: args.top]
    print(f"\n{'kernel':40}{'kind':>12}{'ms':>12}{'share':>8}")
    for k in ranked:
        share = k.latency_ms / result.latency_ms * 100 if result.latency_ms else 0.0
        print(f"{k.name[:40]:40}{k.kind:>12}{k.latency_ms:>12.4f}{share:>7.1f}%")
    for w in result.warnings:
        print(f"warning: {w}")
    return 0


def _print_around(model: str, around) -> None:
    """On stderr: the kernels the estimate got most wrong in the model, and those no profiling unit expresses
    (grouped by the reason: a ShuffleNet has a dozen Splits)."""
    from hwnas.estimator.around import MISPREDICTED

    if around.mispredicted:
        worst = sorted(around.mispredicted.items(), key=lambda kv: -abs(kv[1][1] - kv[1][0]))[:3]
        listed = "; ".join(f"{name} {measured:.3f} ms, estimated {estimated:.3f}" for name, (measured, estimated) in worst)
        print(f"{len(around.mispredicted)} kernel(s) of {model} estimated more than {MISPREDICTED:.0%} off their time in it "
              f"(worst: {listed})", file=sys.stderr)
    by_reason: dict[str, list[str]] = {}
    for name, why in around.skipped.items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        print(f"not sampled ({why}): {', '.join(names)}", file=sys.stderr)


def cmd_profile(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"profile: {out_dir} is a file, not a directory")
    check_output_path(out_dir / "estimator.json") if out_dir.exists() else check_output_path(out_dir)
    if not args.around and (args.estimator or args.input_shape):
        raise BadInputError("profile: --estimator and --input-shape go with --around MODEL")
    if args.around:
        budget = 200 if args.budget is None else args.budget
        with tqdm(total=budget, desc=f"profiling {args.target} around {args.around}", unit="kernel",
                  disable=args.quiet or None) as bar:
            estimator, around = api.profile_around(args.target, args.around, budget, estimator=args.estimator,
                                                   input_shapes=parse_input_shapes(args.input_shape), seed=args.seed,
                                                   progress=bar.update, quiet_gate=not args.no_quiet_gate)
        _print_around(args.around, around)
        if not around.measurements:
            print(f"profile: nothing measured around {args.around} ({len(around.outside)} kernel(s) outside the "
                  f"distribution, none a profiling unit can express); no estimator written", file=sys.stderr)
            return 1
        out_dir.mkdir(exist_ok=True)
        path = out_dir / f"{estimator.target}.json"
        estimator.save(path)
        own = f"{around.model_kernels} kernels of the model timed in context, " if around.model_kernels else ""
        print(f"wrote {path}: {own}{around.measurements - around.model_kernels} measurements around "
              f"{', '.join(around.sampled) or 'none of its kernels'}, refitted on {len(estimator.samples_)}")
        return 0
    budget = 2000 if args.budget is None else args.budget
    with tqdm(total=budget, desc=f"profiling {args.target}", unit="kernel", disable=args.quiet or None) as bar:
        estimator, report = api.profile(args.target, budget, seed=args.seed, progress=bar.update, int8=args.int8,
                                        quiet_gate=not args.no_quiet_gate)
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{estimator.target}.json"
    estimator.save(path)
    last = report.rounds[-1] if report.rounds else {}
    print(f"wrote {path}: {report.measurements} kernel measurements; last round's error before refit: "
          f"MAPE {last.get('mape_before_fit', float('nan')):.2%}, within ±5% {last.get('within_5pct_before_fit', float('nan')):.0%} "
          f"(on neighbours of the worst-fitted kernels, before they joined the fit: high by design; the accuracy on "
          f"models: docs/estimator.md, Accuracy)")
    return 0


def cmd_optimize(args) -> int:
    from tqdm import tqdm

    from hwnas.gate import parse_size

    for path in (args.output, args.report, args.recipe_out):
        if path:
            check_output_path(path)
    model = api.as_model(args.input)
    calibration = load_calibration(args.calib, model) if args.calib else None
    holdout = load_calibration(args.holdout, model) if args.holdout else None
    journal = args.journal or f"{args.output}.search.jsonl"
    # an explicit --trials bounds the search exactly (reproducible, resumable); the default also caps the time
    trials = args.trials or DEFAULT_TRIALS
    time_budget = args.time_budget if args.trials or args.time_budget else DEFAULT_TIME_BUDGET
    best, jobs = [float("inf")], [""]

    def postfix() -> None:
        bar.set_postfix_str(", ".join(x for x in (f"best {best[0]:.4f} ms" if best[0] < float("inf") else "", jobs[0]) if x))

    def progress(n, trial) -> None:
        if trial.score.error is None and trial.score.latency_ms < best[0]:
            best[0] = trial.score.latency_ms
            postfix()
        bar.update(n)

    def job_status(status) -> None:  # with --storage: the batch on the job board, claimed and finished by workers
        text = f"batch: {status.claimed} claimed, {status.finished}/{status.total} finished"
        if text != jobs[0]:
            jobs[0] = text
            postfix()

    with tqdm(total=trials, desc="searching", unit="cand", disable=args.quiet or args.json or None) as bar:
        result = api.optimize(
            model, args.target, exact=args.exact or None, max_drift=args.max_drift, calibration=calibration,
            input_shapes=parse_input_shapes(args.input_shape), algorithm=args.algorithm, space=args.space,
            trials=trials, time_budget=time_budget, seed=args.seed, workers=args.workers,
            memory_budget=parse_size(args.memory_budget) if args.memory_budget else None,
            max_params=parse_size(args.max_params) if args.max_params else None,
            max_peak_act=parse_size(args.max_peak_act) if args.max_peak_act else None,
            estimator=args.estimator, journal=journal, verify=not args.no_verify, progress=progress,
            evaluate_cmd=args.evaluate_cmd, evaluate_timeout=args.evaluate_timeout,
            quality_tolerance=args.quality_tolerance, storage=args.storage, holdout=holdout,
            quantize=args.quantize, quantize_preset=args.quantize_preset, deploy_check=args.deploy_check,
            job_status=job_status,
        )
    save_model(result.model, args.output)
    report = {"input": str(args.input), "output": str(args.output), **result.to_dict()}
    if args.report:
        if args.report.endswith(".html"):
            from hwnas.report.html import write_html

            write_html(args.report, report)
        else:
            write_json(args.report, report)
    if args.recipe_out:
        write_json(args.recipe_out, result.recipe)
    s = result.search
    if s.pass_errors.count:
        print(f"warning: a pass failed on {s.pass_errors.count} candidate(s) (a bug; they were left out): "
              + " | ".join(s.pass_errors.first), file=sys.stderr)
    if args.json:
        print(dumps(report))
        return 0
    b, a = result.baseline, result.optimized
    print(f"target {result.target.name}: estimated latency {b.latency_ms:.4f} → {a.latency_ms:.4f} ms "
          f"({result.latency_reduction:.1%} less); params {_size(b.params_bytes)} → {_size(a.params_bytes)}; "
          f"peak activations {_size(b.peak_activation_bytes)} → {_size(a.peak_activation_bytes)}")
    print(f"search: {s.algorithm} over {s.decisions} decisions ({s.space}), {s.candidates_evaluated} "
          f"candidates in {s.wall_s:.1f} s")
    t = s.seconds
    print(f"time: setup {t['setup']:.1f} s, search {t['search']:.1f} s ({s.candidates_scored} scored here; summed over "
          f"workers: passes and calibration {t['candidates_build']:.1f} s, "
          + (f"quantizer {t['candidates_quantize']:.1f} s, " if result.quantization else "")
          + f"estimation {t['candidates_estimate']:.1f} s, "
          f"drift {t['candidates_drift']:.1f} s), verifying the chosen model {t['verify_chosen']:.1f} s")
    if v := result.verification:
        print(f"verification: {'equivalent' if v.equivalent else 'drift'} (max abs {v.max_abs:.3g}, cosine {v.cosine:.8f})")
    if q := result.quantization:
        print(f"precision: {result.precision}, preset {q.preset} (activations {q.settings.activations}, weights "
              f"{q.settings.weights}{', per channel' if q.settings.per_channel else ''}); latency scored as "
              f"{q.latency_scored_as}"
              + (f"; input side kept float: {q.float_input_side:.0%} of the graph (over --max-drift quantized)"
                 if q.float_input_side else ""))
        for data, fidelity in result.run.drift.items():
            for o in fidelity.outputs:
                top1 = "" if o.top1_agreement is None else f", top-1 agreement {o.top1_agreement:.3f}"
                print(f"drift on {data} ({o.samples} samples), output {o.name}: cosine {o.cosine:.6f}, "
                      f"max abs {o.max_abs:.3g}{top1}")
    if m := result.measured:
        print("measured on the target: " + ", ".join(f"{k.removesuffix('_ms').replace('_', ' ')} {v:.3f} ms"
                                                     for k, v in m.items()))
    if h := result.holdout:
        top1 = "" if h.top1_agreement is None else f", top-1 agreement {h.top1_agreement:.3f}"
        print(f"held-out drift: cosine {h.cosine:.6f}{top1} ({h.samples} samples)")
    if d := result.deploy_check:
        for pipeline, reason in d.rejected:
            print(f"{d.target}: passed over {pipeline or '(no passes)'}: {reason}")
        drift = d.chosen.drift
        top1 = "" if drift.top1_agreement is None else f", top-1 agreement {drift.top1_agreement:.3f}"
        print(f"{d.target}: the written model compiles with all {d.chosen.on_npu} nodes on the NPU, {d.note}; "
              f"NPU drift vs the input on {drift.samples} {drift.inputs} sample(s): cosine {drift.cosine:.5f}{top1}")
    print(f"pipeline: {result.pipeline}")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.output}")
    return 0


def cmd_hints(args) -> int:
    found = api.hints(args.input, args.target, input_shapes=parse_input_shapes(args.input_shape), estimator=args.estimator)
    if args.json:
        print(dumps({"input": str(args.input), "target": args.target, "hints": [h.to_dict() for h in found]}))
        return 0
    for h in found:
        needs = "" if h.exact else " --allow-drift X --calib DATA.npz"
        print(f"{h.saving_ms:>9.4f} ms  {h.message}\n{'':14}hwnas run IN -o OUT --passes '{full_pipeline(h.pipeline)}'{needs}")
    print(f"{len(found)} hints for {args.target}" if found else f"no single rewrite saves estimated latency on {args.target}")
    return 0


def _drift_feeds(args) -> dict:
    """The inputs `check` measures NPU drift on: --holdout, else --calib, else none (seeded random)."""
    path, label = (args.holdout, "held-out") if args.holdout else (args.calib, "calibration")
    if path is None:
        return {}
    return {"feeds": load_calibration(path, api.as_model(args.input)), "feeds_label": label}


def cmd_check(args) -> int:
    from hwnas.report.junit import write_junit

    if args.junit:
        check_output_path(args.junit)
    result = api.check(
        args.input, args.target, max_latency_ms=args.max_latency_ms, max_params=args.max_params,
        max_peak_act=args.max_peak_act, require_multiple=args.require_multiple, baseline=args.baseline,
        max_regression_pct=args.max_regression, input_shapes=parse_input_shapes(args.input_shape),
        estimator=args.estimator, require_npu=args.require_npu, max_drift=args.max_drift, reference=args.reference,
        **_drift_feeds(args),
    )
    if args.junit:
        write_junit(args.junit, result, model=str(args.input))
    if args.json:
        print(dumps({"input": str(args.input), **result.to_dict()}))
    else:
        for item in result.items:
            print(f"{'PASS' if item.passed else 'FAIL'}  {item.message}")
            if item.name.startswith("qnn-htp"):  # the nodes off the NPU, the culprit's quantization
                print("".join(f"      {d}\n" for d in item.details[:40]), end="")
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        failed = [i.name for i in result.failed]
        print(f"{args.input}: {len(failed)} of {len(result.items)} budgets failed ({', '.join(failed)})" if failed
              else f"{args.input}: all {len(result.items)} budgets pass on {result.target}")
    return 0 if result.passed else 1


def cmd_worker(args) -> int:
    on_job = None if args.quiet else lambda pipeline: print(f"evaluating {full_pipeline(pipeline)}", flush=True)
    try:
        done = api.work(args.storage, args.study, once=args.once, max_candidates=args.max_candidates,
                         evaluate_cmd=args.evaluate_cmd, on_job=on_job)
    except KeyboardInterrupt:
        print("hwnas worker: interrupted; a candidate in hand was released to the other workers", file=sys.stderr)
        return 130
    print(f"worker: evaluated {done.evaluated} candidates" + (f" for {done.study}" if done.study else "; no search was running"))
    return 0


COMMANDS = {"check": cmd_check, "worker": cmd_worker, "hints": cmd_hints, "optimize": cmd_optimize, "passes": cmd_passes, "zoo": cmd_zoo, "run": cmd_run, "estimate": cmd_estimate, "profile": cmd_profile}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except HwnasError as e:
        print(f"hwnas: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hwnas: interrupted (an optimize run resumes from its --journal when run again)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hwnas ... | head`: the reader left; that is not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as e:  # a bug: one line by default, the trace on request
        if os.environ.get("HWNAS_DEBUG"):
            raise
        print(f"hwnas: internal error: {type(e).__name__}: {e} (set HWNAS_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3
