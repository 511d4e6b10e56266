"""ONNX graph utilities: loading, shapes, cost counts."""
