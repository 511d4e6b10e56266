"""Verification with ONNX Runtime: equivalence of exact rewrites, drift of reconstructed ones."""

from hwnas.verify.calibration import load_calibration, random_calibration
from hwnas.verify.equivalence import Tolerance, VerificationReport, verify_equivalence
from hwnas.verify.fidelity import measure_fidelity

__all__ = ["Tolerance", "VerificationReport", "load_calibration", "measure_fidelity", "random_calibration", "verify_equivalence"]
