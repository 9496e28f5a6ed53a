"""Writing function bodies: ``op.MatMul(a, b)`` records a node on an onnx-ir tape.

A body is a plain Python function ``body(op, inputs, attrs) -> outputs`` over ``ir.Value``s,
so it can depend on the node's context (attributes, which optional inputs are present, input
types); ``to_function`` packages it as an ``ir.Function`` that the expand pass inlines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.tape import Tape

from .domain import DOMAIN, DOMAIN_VERSION


class OpBuilder:
    """Attribute access builds an op: ``op.Reshape(x, shape)``; ``_outputs=n`` for multi-output."""

    def __init__(self, tape: Tape):
        self.tape = tape

    def __getattr__(self, op_type: str):
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs, _outputs: int = 1, _domain: str = "", **attributes):
            attributes = {k: v for k, v in attributes.items() if v is not None}
            if _outputs == 1:
                return self.tape.op(op_type, list(inputs), attributes, domain=_domain)
            return self.tape.op_multi_out(op_type, list(inputs), attributes, num_outputs=_outputs, domain=_domain)

        return make

    def const(self, value, dtype=None) -> ir.Value:
        """A Constant node holding ``value`` (a Python scalar, list or numpy array)."""
        array = np.asarray(value, dtype=dtype)
        return self.tape.op("Constant", [], {"value": ir.tensor(array)})

    def ints(self, *values: int) -> ir.Value:
        """An int64 1-D constant, the usual shape/axes argument."""
        return self.const(np.array(values, dtype=np.int64))


Body = Callable[[OpBuilder, Sequence["ir.Value | None"], dict], Sequence[ir.Value]]


def to_function(
    body: Body,
    node: ir.Node,
    attributes: dict,
    name: str,
    onnx_opset: int,
    domain: str = "onnxgen.expanded",
) -> ir.Function:
    """Package ``body`` applied to ``node``'s inputs as a function of its present inputs."""
    formal: list[ir.Value] = []
    inputs: list[ir.Value | None] = []
    for i, actual in enumerate(node.inputs):
        if actual is None:
            inputs.append(None)
            continue
        value = ir.Value(name=f"input_{i}", type=actual.type, shape=actual.shape)
        formal.append(value)
        inputs.append(value)
    tape = Tape()
    outputs = list(body(OpBuilder(tape), inputs, attributes))
    # Outputs the node does not use are still produced by the body; only keep those it declares.
    kept = []
    for i, out in enumerate(node.outputs):
        value = outputs[i]
        if value.producer() is None or value in formal:  # an input passed through: copy it
            value = tape.op("Identity", [value])
        value.name = f"output_{i}"
        kept.append(value)
    graph = ir.Graph(
        formal,
        kept,
        nodes=tape.nodes,
        opset_imports={"": onnx_opset, DOMAIN: DOMAIN_VERSION},
        name=name,
    )
    return ir.Function(domain, name, graph=graph, attributes=[])
