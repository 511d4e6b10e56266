"""Kernel → feature vector, the input of the per-kind latency regressors.

Features are the same for every target; what makes them hardware-aware is the parallelism factor (PF)
they are computed with. An array of PF lanes runs a GEMM of P×K by K×N in ceil(K/PF)·ceil(N/PF) folds
of ~P steps, so "work in padded folds" and the channel residues modulo PF (and modulo 4/8/16 for CPUs,
whose SIMD kernels block channels by those) are where latency cliffs come from. The regressors learn
how much each feature matters on a given target from measurements; they never see the target's own
formula.

Two groups: `work_features` (non-negative amounts that latency grows with roughly linearly — the
linear baseline is fitted on these) and `shape_features` (everything, including residues and ratios,
for the boosted correction).
"""

from __future__ import annotations

import math

import numpy as np

from hwnas.targets.kernels import Kernel

# "strided_elements": the elements of a Softmax over a non-innermost axis (`Kernel.inner` > 1), which ORT
# transposes innermost and back (10-20x the time per element): a term of its own, so that a linear fit
# tells the two apart from few samples. "epilogue_elements": output elements × fused ops, what the ops
# riding along cost where the target runs them as passes of their own (ORT CPU: a decomposed hard-swish after a
# conv, 4 passes; without it the trees learnt "5 fused ops: slow" from small unaligned dwconvs and put a 256-channel
# one at 2.4x its time). "slow_int8_outputs": the output elements of an int8 conv off ONNX Runtime's fast int8
# GEMM (`off_fast_int8_gemm`), whose time follows its outputs, not its MACs. "quantize_elements": what the free
# QuantizeLinear nodes ORT runs before the kernel quantize (`Kernel.quantize_elements`), which its in-context time
# carries. "macs" of a depthwise conv or a pool counts the window taps that read input, not padding
# (`valid_tap_fraction`): those kernels walk the window and skip the padding, where a conv's GEMM (im2col) multiplies
# its zeros too. "one" stays last: the fixed cost per kernel.
WORK_FEATURES = ("fold_steps", "folds", "vector_steps", "elements", "macs", "strided_elements", "epilogue_elements",
                 "slow_int8_outputs", "quantize_elements", "one")
# bumped whenever the feature columns or the regressors' settings change: fitted arrays of another version are
# refitted on load (4: trees of 7 leaves, were 15; 5: "rank", and a regressor per elementwise op; 6: measured targets'
# corrections fit a quantile, `estimator.MEASURED_QUANTILE`; 7: a Resize's interpolation; 8: the estimator's last
# column, whether the kernel runs in a small network, `estimator.SMALL_NETWORK_MS`; 9: "slow_int8_outputs";
# 10: "quantize_elements"; 11: no regressor from fewer than `estimator.MIN_SAMPLES_PER_REGRESSOR` samples;
# 12: "valid_taps", and a depthwise conv's or pool's "macs" without the padding's taps)
FEATURES_VERSION = 12


def _folds(kernel: Kernel, pf: int) -> tuple[float, float]:
    """(padded fold steps, fold count) of the kernel's GEMM view on PF lanes; zeros without one."""
    g = kernel.gemm
    if g is None:
        return 0.0, 0.0
    folds = g.groups * math.ceil(g.k / pf) * math.ceil(g.n / pf)
    return float(folds * g.p), float(folds)


def off_fast_int8_gemm(kernel: Kernel) -> bool:
    """An int8 (non-grouped) conv that ONNX Runtime's CPU runs off its fast int8 GEMM: input or output channels
    not a multiple of 4, or fewer than 16 outputs. Measured in context (1x1, 2-core Xeon with AVX-512 VNNI,
    ORT 1.32): 14 -> 84 channels at 112x112 1.07 ms, 16 -> 84 0.23 ms, 12 -> 84 0.21 ms; 16 -> 12, 16 -> 17 and
    16 -> 18 0.15-0.44 ms, 16 -> 20 0.09 ms; ~1 ns per output element whatever the input channels (13-129).
    The channel residues let the trees see the cliff; this term lets the linear part carry it to large maps."""
    return kernel.int8 and kernel.kind == "conv" and (kernel.c_in % 4 != 0 or kernel.c_out % 4 != 0 or kernel.c_out < 16)


def work_features(kernel: Kernel, pf: int) -> list[float]:
    fold_steps, folds = _folds(kernel, pf)
    elements = float(kernel.input_elements + kernel.weight_elements + kernel.output_elements)
    vector_steps = float(math.ceil(max(kernel.output_elements * max(kernel.window, 1), kernel.input_elements) / pf))
    if kernel.kind == "free":
        return [0.0] * len(WORK_FEATURES)
    return [fold_steps, folds, vector_steps, elements, float(kernel.macs) * (1.0 if kernel.kind == "conv" else valid_tap_fraction(kernel)),
            elements if kernel.inner > 1 else 0.0, float(kernel.output_elements * len(kernel.fused_ops)),
            float(kernel.output_elements) if off_fast_int8_gemm(kernel) else 0.0, float(kernel.quantize_elements), 1.0]


SHAPE_FEATURES = (
    "log_fold_steps", "log_folds", "log_vector_steps", "log_elements", "log_macs", "log_weights",
    "c_in", "c_out", "kernel_h", "kernel_w", "stride", "groups", "log_p", "log_k", "log_n",
    "c_in_mod_pf", "c_out_mod_pf", "c_in_mod_4", "c_in_mod_8", "c_in_mod_16", "c_out_mod_4", "c_out_mod_8",
    "c_out_mod_16", "lane_use_k", "lane_use_n", "depthwise", "fused_ops", "residual", "window",
    "log_compute_over_bytes", "log_inner", "rank", "taps", "coordinates", "nearest_mode", "valid_taps",
)
# A Resize's interpolation (`Kernel.interpolation`) as numbers: inputs read per output along each resized axis,
# and the position of its coordinate transformation and nearest modes below (0: none, or one not listed)
_TAPS = {"nearest": 1, "linear": 2, "cubic": 4}
_COORDINATES = ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "half_pixel_symmetric",
                "tf_crop_and_resize")
_NEAREST_MODES = ("round_prefer_floor", "floor", "round_prefer_ceil", "ceil")


def input_rank(kernel: Kernel) -> int:
    """The number of axes of the kernel's first input (0 for none)."""
    return len(kernel.input_shapes[0]) if kernel.input_shapes else 0


def shape_features(kernel: Kernel, pf: int) -> list[float]:
    fold_steps, folds = _folds(kernel, pf)
    g = kernel.gemm
    elements = kernel.input_elements + kernel.weight_elements + kernel.output_elements
    vector_steps = math.ceil(max(kernel.output_elements * max(kernel.window, 1), kernel.input_elements) / pf)
    lane_k = (g.k / (math.ceil(g.k / pf) * pf)) if g else 1.0
    lane_n = (g.n / (math.ceil(g.n / pf) * pf)) if g else 1.0
    compute = fold_steps if g else vector_steps
    return [
        math.log1p(fold_steps), math.log1p(folds), math.log1p(vector_steps), math.log1p(elements),
        math.log1p(kernel.macs), math.log1p(kernel.weight_elements),
        kernel.c_in, kernel.c_out, kernel.kernel_h, kernel.kernel_w, kernel.stride_h, kernel.groups,
        math.log1p(g.p if g else 0), math.log1p(g.k if g else 0), math.log1p(g.n if g else 0),
        kernel.c_in % pf, kernel.c_out % pf, kernel.c_in % 4, kernel.c_in % 8, kernel.c_in % 16,
        kernel.c_out % 4, kernel.c_out % 8, kernel.c_out % 16, lane_k, lane_n,
        float(kernel.kind == "dwconv"), len(kernel.fused_ops), float(kernel.residual), kernel.window,
        math.log1p(compute) - math.log1p(elements), math.log1p(kernel.inner),
        # the input's dimensions: a 6-D Transpose (a pixel shuffle's) gathers with a 2-wide innermost stride, 4-8x
        # the time per element of a 3-/4-D one; a 3-D conv input is a 1-D conv, which ORT runs outside NCHWc
        float(input_rank(kernel)),
        *_interpolation_codes(kernel.interpolation),
        valid_tap_fraction(kernel),
    ]


def valid_tap_fraction(kernel: Kernel) -> float:
    """The share of a conv's or pool's window taps that read its input, not its zero padding.

    ORT's depthwise kernels skip the window rows that fall into the padding, so a 5x5 depthwise conv on a text
    line's 2-3 x 96 map (40-60 % of its taps valid) takes a fraction of the time per MAC of one on a square map.
    Without this the Xeon estimator put PP-OCRv3/v4 rec, whose backbones end on such maps, at +21/+23 % and PP-OCR
    cls at +52 %; with it (a feature of the trees, and in depthwise convs' and pools' MACs) at +5/+8 % and +37 %
    (2026-12-07).
    The padding is what the shapes leave over, split evenly (explicit pads as exporters write them; SAME_UPPER
    up to one row)."""
    if kernel.kind not in ("conv", "dwconv", "pool") or not kernel.input_shapes or not kernel.output_shapes:
        return 1.0
    x, y = kernel.input_shapes[0], kernel.output_shapes[0]
    if len(x) != len(y) or len(x) < 3:
        return 1.0
    windows = ((kernel.kernel_h, kernel.stride_h, kernel.dilation_h),
               (kernel.kernel_w, kernel.stride_w, kernel.dilation_w))
    fraction = 1.0
    for size_in, size_out, (k, stride, dilation) in zip(x[2:], y[2:], windows):
        if k == 1 or size_out < 1:
            continue
        before = max(0, (size_out - 1) * stride + dilation * (k - 1) + 1 - size_in) // 2
        valid = 0
        for tap in range(k):  # the outputs o whose read o·stride − before + tap·dilation lies in [0, size_in)
            offset = tap * dilation - before
            first = max(0, -(offset // stride))  # ceil(−offset / stride)
            last = min(size_out - 1, (size_in - 1 - offset) // stride)
            valid += max(0, last - first + 1)
        fraction *= valid / (size_out * k)
    return fraction


def _interpolation_codes(interpolation: str) -> tuple[float, float, float]:
    if not interpolation:
        return 0.0, 0.0, 0.0
    mode, coordinates, *nearest = interpolation.split(":")

    def position(value: str, names: tuple[str, ...]) -> float:
        return float(names.index(value) + 1) if value in names else 0.0

    return float(_TAPS.get(mode, 0)), position(coordinates, _COORDINATES), position(nearest[0] if nearest else "", _NEAREST_MODES)


def feature_matrix(kernels: list[Kernel], pf: int) -> tuple[np.ndarray, np.ndarray]:
    """(work, shape) feature matrices, one row per kernel."""
    work = np.array([work_features(k, pf) for k in kernels], dtype=np.float64).reshape(len(kernels), len(WORK_FEATURES))
    shape = np.array([shape_features(k, pf) for k in kernels], dtype=np.float64).reshape(len(kernels), len(SHAPE_FEATURES))
    return work, shape
