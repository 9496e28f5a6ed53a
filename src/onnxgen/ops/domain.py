"""The experimental operator domain: named here so a move to ``ai.onnx.preview`` is a rename."""

DOMAIN = "onnxgen.preview"
DOMAIN_VERSION = 1

# The standard opset the function bodies are written against (TensorScatter, Attention-24 era).
MIN_ONNX_OPSET = 24
