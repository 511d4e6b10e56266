"""A stand-in for a device's benchmark tool, driven by the cmd target's tests: `time_ort.py MODEL`.

It times MODEL with ONNX Runtime (CPU, 1 thread) and honours the cmd-target contract
(docs/measurement.md): the last line on stdout is the median latency in milliseconds. It reads the
input shapes from the model file, which the cmd target writes with its inputs fixed.
"""

import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def main(path: str) -> None:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    for _ in range(5):
        session.run(None, feeds)
    times_ms = []
    for _ in range(20):
        start = time.perf_counter()
        session.run(None, feeds)
        times_ms.append((time.perf_counter() - start) * 1e3)
    print(f"timed {path} {len(times_ms)} times")  # chatter before the answer is allowed
    print(f"{statistics.median(times_ms):.4f} ms")


if __name__ == "__main__":
    main(sys.argv[1])
