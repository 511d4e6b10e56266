"""A stand-in for a user's fine-tune-and-evaluate script: `python score_candidate.py MODEL [options]`.

Prints `score: S` (higher is better) computed from the model file alone, deterministically:
  --keep-depthwise NAME   S = 1 if conv NAME is still depthwise (group = its output channels), else 0
  (default)               S = 1 / number of nodes (fewer nodes score higher)
  --fail MESSAGE          print MESSAGE on stderr and exit with status 3 (a crashed training run)
"""

import argparse
import sys

import onnx


def is_depthwise(model: onnx.ModelProto, name: str) -> bool:
    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name == name and node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            return group > 1 and group == weights[node.input[1]].dims[0]
    return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--keep-depthwise")
    parser.add_argument("--fail")
    args = parser.parse_args()
    if args.fail:
        print("epoch 1/3 ...", flush=True)
        print(args.fail, file=sys.stderr)
        return 3
    model = onnx.load(args.model)
    if args.keep_depthwise:
        score = 1.0 if is_depthwise(model, args.keep_depthwise) else 0.0
    else:
        score = 1.0 / len(model.graph.node)
    print("fine-tuned 3 epochs")
    print(f"score: {score:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
