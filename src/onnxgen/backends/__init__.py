"""How a model runs: the onnx reference evaluator with our ops, onnxruntime sessions."""
