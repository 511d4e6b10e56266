"""hwnas: an accelerator-aware ONNX optimizer."""
