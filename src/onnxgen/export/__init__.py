"""PyTorch / Hugging Face -> ONNX with the onnxgen.preview ops.

Kept light: nothing here imports torch; the mappings work on numpy state dicts.
"""
