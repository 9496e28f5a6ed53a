"""onnxgen: generative AI as ONNX.

Importing the package registers the ``onnxgen.preview`` operator domain (PagedAttention, MoE,
GroupedMatMul) with ``onnx.defs``, so the checker and shape inference understand models that
use it.
"""

from .ops import OPS, register as _register
from .ops.domain import DOMAIN, DOMAIN_VERSION

_register()

__version__ = "0.1.0"
__all__ = ["DOMAIN", "DOMAIN_VERSION", "OPS", "__version__"]
