"""Targets by name: `cpu[:threads=N]`, `npu-RxC` or an npu config file, `ort:<EP>[,k=v...]`, `cmd:<command {model}>`, `qnn-htp`
(Qualcomm's NPU backend: deployability checks, latency from the int8 npu estimator)."""

from __future__ import annotations

from hwnas.errors import BadInputError
from hwnas.targets.base import Measurement, Target


def get_target(spec: str) -> Target:
    """Parse a target description; unknown ones are bad input (exit 2)."""
    spec = spec.strip()
    if spec == "cpu" or spec.startswith("cpu:"):
        from hwnas.targets.cpu import CpuTarget

        return CpuTarget.from_spec(spec)
    if spec == "qnn-htp" or spec.startswith("qnn-htp:"):
        from hwnas.targets.qnn_htp import QnnHtpTarget

        return QnnHtpTarget.from_spec(spec)
    if spec.startswith("npu") or spec.endswith((".json", ".toml")):
        from hwnas.targets.npu import NpuTarget

        return NpuTarget.from_spec(spec)
    if spec.startswith("ort:"):
        from hwnas.targets.ort_ep import OrtTarget

        return OrtTarget.from_spec(spec)
    if spec.startswith("cmd:"):
        from hwnas.targets.command import CommandTarget

        return CommandTarget.from_spec(spec)
    raise BadInputError(f"unknown target {spec!r}: use cpu, cpu:threads=N, npu-32x32, npu-16x16, NPU.json, ort:<EP>, cmd:<command {{model}}>, qnn-htp")


__all__ = ["Measurement", "Target", "get_target"]
