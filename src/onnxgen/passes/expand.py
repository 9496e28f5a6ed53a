"""expand: replace every operator a stock runtime lacks by its function body.

Nodes of the ``onnxgen.preview`` domain are turned into model-local functions built from their
bodies (which depend on the node's attributes and input types), and so is
``ai.onnx.preview.FlexAttention`` through onnx's own context-dependent function; onnx-ir's
inliner then splices the functions in.  Bodies may use other ops of ours (MoE is written over
GroupedMatMul), so this repeats until none are left.  The result runs on stock onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx import defs

from ..ops import OPS, DOMAIN
from ..ops._builder import to_function
from ..ops.domain import MIN_ONNX_OPSET

EXPANDED_DOMAIN = "onnxgen.expanded"
FLEX_DOMAIN = "ai.onnx.preview"
_MAX_ROUNDS = 8
_FROM_BODY = "onnxgen.expand.from_body"


def expand(model: onnx.ModelProto, only: Callable[[ir.Node], bool] | None = None) -> onnx.ModelProto:
    """Return a copy of ``model`` with every onnxgen op and FlexAttention inlined as standard ops.

    ``only(node)`` restricts the first round to the nodes it accepts (the ones a kernel library
    cannot run, say); what their bodies produce is expanded in turn.
    """
    ir_model = ir.serde.deserialize_model(model)
    opset = ir_model.opset_imports.get("", 0)
    if opset < MIN_ONNX_OPSET:
        raise ValueError(
            f"expand: the model imports the standard opset {opset}; the function bodies need "
            f">= {MIN_ONNX_OPSET}. Convert it first (onnx.version_converter)."
        )
    if ir_model.functions:  # our nodes may sit inside the model's own functions
        common_passes.InlinePass()(ir_model)
    for round_ in range(_MAX_ROUNDS):
        common_passes.ShapeInferencePass(strict_mode=True)(ir_model)
        calls = [
            node for node in ir.traversal.RecursiveGraphIterator(ir_model.graph)
            if _expandable(node) and (only is None or round_ > 0 and node.meta.get(_FROM_BODY) or only(node))
        ]
        if not calls:
            break
        for index, node in enumerate(calls):
            function = _function_for(node, f"{node.op_type}_{len(ir_model.functions)}_{index}", opset)
            for inner in ir.traversal.RecursiveGraphIterator(function):
                inner.meta[_FROM_BODY] = True
            ir_model.functions[function.identifier()] = function
            _call(node, function)
        ir_model.opset_imports[EXPANDED_DOMAIN] = 1
        common_passes.InlinePass()(ir_model)
    else:
        raise RuntimeError(f"expand: custom ops remain after {_MAX_ROUNDS} rounds")
    for domain in (DOMAIN, FLEX_DOMAIN, EXPANDED_DOMAIN):
        if not any(n.domain == domain for n in ir.traversal.RecursiveGraphIterator(ir_model.graph)):
            ir_model.opset_imports.pop(domain, None)
    return ir.serde.serialize_model(ir_model)


def _expandable(node: ir.Node) -> bool:
    return (node.domain == DOMAIN and node.op_type in OPS) or (
        node.domain == FLEX_DOMAIN and node.op_type == "FlexAttention"
    )


def _function_for(node: ir.Node, name: str, opset: int) -> ir.Function:
    if node.domain == DOMAIN:
        op = OPS[node.op_type]
        return to_function(op.body, node, node_attributes(node, op.schema), name, opset, EXPANDED_DOMAIN)
    return _flex_attention_function(node, name, opset)


def node_attributes(node: ir.Node, schema: defs.OpSchema) -> dict:
    """The node's attributes as Python values, schema defaults filled in, unknown ones refused."""
    values = {}
    for attr_name, spec in schema.attributes.items():
        if attr_name in node.attributes:
            attr = node.attributes[attr_name]
            values[attr_name] = attr.value
        elif spec.default_value is not None and spec.default_value.type != 0:
            values[attr_name] = onnx.helper.get_attribute_value(spec.default_value)
        else:
            values[attr_name] = None
    unknown = set(node.attributes) - set(schema.attributes)
    if unknown:
        raise ValueError(f"{node.op_type} node {node.name!r}: unknown attributes {sorted(unknown)}")
    return values


def _flex_attention_function(node: ir.Node, name: str, opset: int) -> ir.Function:
    schema = defs.get_schema("FlexAttention", node.version or 1, FLEX_DOMAIN)
    input_types = []
    for value in node.inputs:
        if value is None or value.type is None:
            raise ValueError(f"expand: FlexAttention node {node.name!r} needs typed inputs")
        type_proto = onnx.TypeProto()
        ir.serde.serialize_type_into(type_proto, value.type)
        if value.shape is not None:
            ir.serde.serialize_shape_into(type_proto, value.shape)
        input_types.append(type_proto.SerializeToString())
    node_proto = ir.serde.serialize_node(node)
    function_proto = onnx.FunctionProto()
    function_proto.ParseFromString(
        schema.get_context_dependent_function(node_proto.SerializeToString(), input_types)
    )
    function_proto.name, function_proto.domain = name, EXPANDED_DOMAIN
    del function_proto.attribute[:]  # the attributes are already baked into the body
    function_proto.opset_import.append(onnx.helper.make_opsetid("", opset))
    present = [i for i, v in enumerate(node.inputs) if v is not None]
    if len(present) != len(node.inputs):
        raise ValueError("expand: FlexAttention with omitted inputs is not supported")
    return ir.serde.deserialize_function(function_proto)


def _call(node: ir.Node, function: ir.Function) -> None:
    """Replace ``node`` by a call of ``function`` on its present inputs."""
    call = ir.Node(
        function.domain,
        function.name,
        inputs=[v for v in node.inputs if v is not None],
        num_outputs=len(node.outputs),
        name=node.name,
    )
    graph = node.graph
    ir.convenience.replace_nodes_and_values(graph, node, [node], [call], list(node.outputs), list(call.outputs))
