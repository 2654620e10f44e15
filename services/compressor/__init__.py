"""The compressor service: ONNX export, quantised and FP16 variants, Triton repository entries."""
