"""Running a trained model: one runtime protocol (PyTorch, ONNX Runtime fp32 and int8) and one exit loop."""
