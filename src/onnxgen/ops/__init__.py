"""The operator set of the ``onnxgen.preview`` domain.

Each op lives in its own module with its schema (and type/shape inference), its numpy
reference (the math as a plain function plus a thin ``onnx.reference`` OpRun) and its function
body in standard ONNX ops.  ``OPS`` indexes them by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from . import _schema, grouped_matmul, moe, paged_attention
from .domain import DOMAIN, DOMAIN_VERSION


@dataclass(frozen=True)
class OpDef:
    name: str
    module: ModuleType

    @property
    def schema(self):
        return self.module.SCHEMA

    @property
    def reference(self):
        """The ``onnx.reference`` OpRun class."""
        return getattr(self.module, self.name)

    @property
    def body(self):
        """``body(op, inputs, attrs) -> outputs``: the decomposition into standard ops."""
        return self.module.body


OPS: dict[str, OpDef] = {
    m.NAME: OpDef(m.NAME, m) for m in (paged_attention, moe, grouped_matmul)
}


def register() -> None:
    """Register every schema with ``onnx.defs`` (idempotent)."""
    for op in OPS.values():
        _schema.register(op.schema, op.module.infer)


__all__ = ["DOMAIN", "DOMAIN_VERSION", "OPS", "OpDef", "register"]
