"""What `quantize{bias_correction=true}` buys: each model quantized with and without it, drift on held-out inputs.

    PYTHONPATH=. python benchmarks/studies/bias_correction.py [--preset qnn] [--models NAME ...]
        [--fit 16] [--held-out 64] [--calib-seeds 0 1 2]

For each model and calibration draw: `fold-bn,fold-affine,quantize{preset=P,bias_correction=false|true}` through
`hwnas.api.run`, on the calibration draws and the held-out inputs of `equalize_drift.py` (16 realistic inputs a
draw, the same 64 held-out ones for every draw). Prints the held-out drift (1 − cosine over all outputs of all
held-out inputs) and top-1 agreement without and with the correction.
"""

from __future__ import annotations

import argparse

from equalize_drift import REAL, ZOO, data

from hwnas import api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qnn", choices=("cpu", "qnn", "npu"))
    parser.add_argument("--models", nargs="*", default=["mobilenetv2", *REAL])
    parser.add_argument("--fit", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print(f"| model (preset={args.preset}) | calibration draw | drift without | with bias_correction | top-1 without / with |")
    print("|---|---|---|---|---|")
    for name in args.models:
        if name not in (*ZOO, *REAL):
            parser.error(f"unknown model {name!r} (known: {', '.join((*ZOO, *REAL))})")
        for seed in args.calib_seeds:
            model, shapes, fit, held = data(name, args.fit, args.held_out, seed)
            row = []
            for corrected in ("false", "true"):
                result = api.run(model, f"fold-bn,fold-affine,quantize{{preset={args.preset},bias_correction={corrected}}}",
                                 input_shapes=shapes, calibration=fit, holdout=held, allow_drift=1.0)
                row.append(result.drift["holdout"])
            top1 = " / ".join("-" if d.top1_agreement is None else f"{d.top1_agreement:.3f}" for d in row)
            print(f"| {name} | {seed} | {1 - row[0].cosine:.3g} | {1 - row[1].cosine:.3g} | {top1} |", flush=True)


if __name__ == "__main__":
    main()
