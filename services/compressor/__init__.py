"""The compressor service: ONNX export, quantised/pruned variants, Triton repository entries."""
