"""PagedAttention (being written)."""
from onnx.reference.op_run import OpRun
from . import _schema as S
from .domain import DOMAIN, DOMAIN_VERSION
NAME = "PagedAttention"
SCHEMA = S.Schema(NAME, DOMAIN, DOMAIN_VERSION, "placeholder", inputs=[S.param("X", "T", "")], outputs=[S.param("Y", "T", "")], type_constraints=[("T", S.FLOATS, "")])
def infer(ctx): pass
class PagedAttention(OpRun):
    op_domain = DOMAIN
    def _run(self, x): raise NotImplementedError
def body(op, inputs, attrs): raise NotImplementedError
