"""Rebuild the networks of a cpu profile's random third, to try a feature read from a network's graph without timing.

A context profile (`profile_cpu.py`) draws its first third of the budget from `random_network` with its seed
(every `int8_every`-th network quantized, the calibration drawn from the same generator), so those networks can
be built again and each stored sample matched to its kernel: a new per-kernel quantity that comes from the
graph (what ORT's optimized graph says of it, a neighbour's layout) can then be computed for a third of the
samples, and an estimator refitted on that third with and without it scored on the held-out medians
(`estimator_accuracy.py --measured`). The adaptive rounds after it perturb the worst-fitted blocks, which
depends on the timings, and are not rebuilt. Only a profile of the current `networks.py` replays: this script
says how many of the third's samples matched (2026-12-06: a profile of that day, 1,000 of 1,000).

    python benchmarks/studies/profile_replay.py PROFILE/cpu.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hwnas import api  # noqa: E402
from hwnas.estimator.estimator import LatencyEstimator, Sample  # noqa: E402
from hwnas.estimator.networks import random_network  # noqa: E402
from hwnas.estimator.profile import is_int8_network, profiled_network  # noqa: E402
from hwnas.targets.kernels import Kernel, decompose  # noqa: E402


def random_third(estimator: LatencyEstimator) -> list[Sample]:
    """The samples of the profile's random third (`profile._adaptive`'s first draw)."""
    return estimator.samples_[: estimator.target_config["profiling"]["budget"] // 3]


def replay(estimator: LatencyEstimator) -> Iterator[tuple[int, onnx.ModelProto, dict, list[Kernel]]]:
    """(network index, model, input shapes, kernels) of each network of the profile's random third."""
    profiling = estimator.target_config["profiling"]
    every = profiling.get("int8_every", 1)
    rng = np.random.default_rng(profiling["seed"])
    quantize = api.profiling_quantizer() if "int8_every" in profiling else None
    for network in range(max(s.network for s in random_third(estimator)) + 1):
        config = random_network(rng, mix="mobile" if is_int8_network(network, quantize, every) else "any")
        model, _, _ = profiled_network(config, network, rng, quantize, every)
        shapes = {"x": (1, config.c_in, config.size, config.size)}
        yield network, model, shapes, decompose(model, shapes, estimator.rules)


def matched_samples(estimator: LatencyEstimator) -> list[tuple[Sample, Kernel]]:
    """The random third's samples, each with its kernel as built again (those whose kernel did not match left out)."""
    by_network: dict[int, list[Sample]] = {}
    for s in random_third(estimator):
        by_network.setdefault(s.network, []).append(s)
    out = []
    for network, _, _, kernels in replay(estimator):
        rebuilt = {k.name: k for k in kernels}
        for s in by_network.get(network, []):
            k = rebuilt.get(s.kernel.name)
            if k is not None and k.op == s.kernel.op and k.input_shapes == s.kernel.input_shapes:
                out.append((s, k))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile", help="a context profile's estimator file (profile_cpu.py -o DIR: DIR/cpu.json)")
    args = parser.parse_args()
    estimator = LatencyEstimator.load(args.profile)
    matched = matched_samples(estimator)
    print(f"{len(matched)} of the random third's {len(random_third(estimator))} samples matched their rebuilt kernels")


if __name__ == "__main__":
    main()
