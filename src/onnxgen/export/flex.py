"""PyTorch ``flex_attention`` -> ``ai.onnx.preview.FlexAttention`` (and PagedAttention's score_mod).

torch.onnx's dynamo exporter captures ``torch.nn.attention.flex_attention.flex_attention`` as
the higher-order op ``torch.ops.higher_order.flex_attention``; it translates the op's
``score_mod`` and the BlockMask's ``mask_mod`` (FX subgraphs over scalars) into ONNX functions
and hands them, with the captured tensors, to the translation registered for the op in
``custom_translation_table``.  ``translation_table()`` gives that translation:

- the ``score_mod`` function body becomes a pointwise score graph
  ``(score, batch, head, q_pos, kv_pos) -> score`` (``to_pointwise``: torchlib's indexing of
  captured tables — Transpose/Expand/Unsqueeze/Concat/GatherND over scalars — is rewritten to
  a Gather from a flattened constant table, captured tensors become constants);
- the ``mask_mod`` is folded in as ``Where(mask_mod(b, h, q, kv), score, -inf)`` (a mask that
  is constantly true, flex_attention's default, is dropped).  The BlockMask's block-level
  sparsity is taken to be what its ``mask_mod`` implies (as ``create_block_mask`` builds it);
- the node is ``FlexAttention(Q, K, V)`` with ``scale`` and ``score_mod`` =
  ``score_mods.flex_score_mod(pointwise)`` (index tensors from Shape/Range/Unsqueeze), which
  ``onnxgen.backends.ort.session`` runs on the compiled kernel (``passes.flex_kernel``) and
  any other runtime through the op's expansion.

``export(module, args)`` is ``torch.export.export`` then ``torch.onnx.export(..., dynamo=True)``
with the table, an opset the FlexAttention expansion accepts and ``own_constants``.  Calling
torch.onnx.export yourself: pass ``custom_translation_table=translation_table(program)`` with
the ExportedProgram, trace a flex_attention call that has no BlockMask inside
``constant_default_block_mask()`` (torch builds its default mask in forward with argsort,
which torch.onnx cannot translate) and call ``own_constants`` on the result.  For a paged model, ``score_mod_graph(score_mod,
mask_mod)`` traces Python mods the same way into the pointwise graph that PagedAttention's
``score_mod`` attribute takes (positions are absolute there, as in a flex_attention call over a
whole sequence), and ``score_mods.pointwise_of`` recovers it from an exported node.

Not translated (a clear error at export): ``return_lse``/``return_max`` (the extra outputs),
captured tensors that are not constants (a forward input read inside score_mod), and mods
whose ops are not pointwise after the rewrite (the op is named).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ops import score_mods as sm
from ..ops.flex_score import INPUT_NAMES, INPUT_TYPES, ScoreModError, check

FLEX_DOMAIN = "ai.onnx.preview"
DEFAULT_OPSET = 25
_NEG_INF = np.float32(-np.inf)
_INT = {TensorProto.INT32, TensorProto.INT64}


class FlexExportError(ValueError):
    """A flex_attention call the translation cannot lower (the message says why)."""


# ---- an exported score_mod / mask_mod function -> a pointwise score graph ---------------------

def _eval_node(node: onnx.NodeProto, values: list[np.ndarray], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" for i in range(len(values))]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [names[i] if x else "" for i, x in enumerate(node.input)]
    copy.output[:] = [f"out{i}" for i in range(len(node.output))]
    graph = helper.make_graph([copy], "fold", [helper.make_tensor_value_info(n, 0, None) for n in names],
                              [helper.make_tensor_value_info(o, 0, None) for o in copy.output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, {n: v for n, v in zip(names, values)})


class _Scalarizer:
    """Rewrites a function body evaluated on scalar inputs into pointwise ops (see to_pointwise)."""

    _SAME = {"Identity", "Squeeze", "Reshape", "Flatten", "Transpose", "Expand"}

    def __init__(self, name: str, opset: int):
        self.g = sm._Graph(name)
        self.opset = opset
        self.names: dict[str, str] = {}      # function value -> graph value
        self.consts: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple] = {}
        self.types: dict[str, int] = {}
        self.vectors: dict[str, list[str]] = {}  # a 1-D vector of scalars (Unsqueeze/Concat), by component

    def input(self, name: str, graph_name: str, elem_type: int):
        self.names[name], self.shapes[name], self.types[name] = graph_name, (), elem_type

    def constant(self, name: str, array: np.ndarray):
        array = np.asarray(array)
        self.consts[name], self.shapes[name] = array, array.shape
        self.types[name] = helper.np_dtype_to_tensor_dtype(array.dtype)

    def ref(self, name: str) -> str:
        if name in self.names:
            return self.names[name]
        array = self.consts[name]
        if array.size == 1:
            array = array.reshape(())
        self.names[name] = self.g.const(array, array.dtype)
        return self.names[name]

    def alias(self, out: str, src: str):
        self.shapes[out], self.types[out] = (), self.types.get(src, 0)
        if src in self.consts:
            self.constant(out, self.consts[src].reshape(()))
        else:
            self.names[out] = self.names[src]
        if src in self.vectors:
            self.vectors[out] = self.vectors[src]

    def emit(self, op_type: str, inputs: list[str], out: str, elem_type: int, **attrs) -> None:
        self.names[out] = self.g.op(op_type, *inputs, **attrs)
        self.shapes[out], self.types[out] = (), elem_type

    def node(self, node: onnx.NodeProto, where: str) -> None:
        op, ins, outs = node.op_type, list(node.input), list(node.output)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        label = f"{where}: {op} node {node.name or outs[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            raise FlexExportError(f"{label} is of domain {node.domain!r}; only standard ops can be lowered")
        if op == "Constant":
            (value,) = _eval_node(node, [], self.opset)
            self.constant(outs[0], value)
            return
        present = [x for x in ins if x]
        for x in present:
            if x not in self.shapes:
                raise FlexExportError(f"{label} reads {x!r}, which the function does not compute")
        if all(x in self.consts for x in present) and op not in ("RandomNormal", "RandomUniform"):
            values = _eval_node(node, [self.consts[x] if x else None for x in ins], self.opset)
            for o, v in zip(outs, values):
                self.constant(o, v)
            return
        shapes = [self.shapes[x] for x in present]
        size1 = all(int(np.prod(s)) == 1 for s in shapes[:1])
        if op in ("Shape", "Size"):
            shape = np.asarray(self.shapes[ins[0]], np.int64)
            if op == "Size":
                self.constant(outs[0], np.asarray(shape.prod(), np.int64))
            else:
                self.constant(outs[0], shape[attrs.get("start", 0):attrs.get("end", len(shape))])
            return
        if op in ("Max", "Min", "Sum", "Mean") and len(present) == 1:
            self.alias(outs[0], ins[0])
            return
        if op == "Unsqueeze" and size1:
            self.alias(outs[0], ins[0])
            self.vectors[outs[0]] = self.vectors.get(ins[0], [ins[0]])
            return
        if op in self._SAME and size1:
            self.alias(outs[0], ins[0])
            return
        if op == "Concat":
            components = []
            for x in present:
                if x in self.vectors:
                    components.extend(self.vectors[x])
                elif int(np.prod(self.shapes[x])) == 1:
                    components.append(x)
                else:
                    raise FlexExportError(f"{label} concatenates a tensor of shape {list(self.shapes[x])}")
            if len(components) == 1:
                self.alias(outs[0], components[0])
            else:
                self.shapes[outs[0]], self.types[outs[0]] = (len(components),), self.types[components[0]]
            self.vectors[outs[0]] = components
            return
        if op == "GatherND" and ins[0] in self.consts:
            table = self.consts[ins[0]]
            index = self.vectors.get(ins[1], [ins[1]] if int(np.prod(self.shapes[ins[1]])) == 1 else None)
            if attrs.get("batch_dims", 0) != 0 or index is None or len(index) != table.ndim:
                raise FlexExportError(f"{label}: only a constant table indexed by one scalar per dimension "
                                      "(table[i, j, ...]) can be lowered")
            self._gather(table, index, outs[0])
            return
        if op == "Gather" and ins[0] in self.consts and int(np.prod(self.shapes[ins[1]])) == 1:
            table = self.consts[ins[0]]
            if table.ndim != 1 or attrs.get("axis", 0) != 0:
                raise FlexExportError(f"{label}: a row of a {table.ndim}-D table; index it with one scalar per "
                                      "dimension (table[i, j])")
            self._gather(table, [ins[1]], outs[0])
            return
        if op == "CastLike":
            self.emit("Cast", [self.ref(ins[0])], outs[0], self.types[ins[1]], to=self.types[ins[1]])
            return
        # Everything else is copied; flex_score.check names what is not pointwise.
        inputs = [self.ref(x) if x else "" for x in ins]
        copy = helper.make_node(op, inputs, [self.g.fresh(op.lower()) for _ in outs], name=self.g.fresh(op))
        copy.attribute.extend(node.attribute)
        self.g.nodes.append(copy)
        out_type = self._result_type(op, ins, attrs)
        for o, name in zip(outs, copy.output):
            self.names[o] = name
            self.shapes[o] = tuple(np.broadcast_shapes(*shapes)) if shapes else ()
            self.types[o] = out_type

    def _gather(self, table: np.ndarray, index: list[str], out: str) -> None:
        """table[i0, i1, ...] for scalar indices -> Gather from the flattened table."""
        if table.ndim == 1:
            flat = self.ref(index[0])
        else:
            strides = np.cumprod((table.shape[1:] + (1,))[::-1])[::-1]
            flat = None
            for axis, (i, stride) in enumerate(zip(index, strides)):
                term = self.ref(i)
                if self.types.get(i) != TensorProto.INT64:
                    term = self.g.op("Cast", term, to=TensorProto.INT64)
                # a negative index counts from the end of its dimension, as in torch
                term = self.g.op("Where", self.g.op("Less", term, self.g.const(0, np.int64)),
                                 self.g.op("Add", term, self.g.const(table.shape[axis], np.int64)), term)
                if stride != 1:
                    term = self.g.op("Mul", term, self.g.const(int(stride), np.int64))
                flat = term if flat is None else self.g.op("Add", flat, term)
        self.names[out] = self.g.op("Gather", self.g.const(table.reshape(-1), table.dtype), flat)
        self.shapes[out], self.types[out] = (), helper.np_dtype_to_tensor_dtype(table.dtype)

    def _result_type(self, op: str, ins: list[str], attrs: dict) -> int:
        if op in ("Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "And", "Or", "Not", "Xor", "IsInf",
                  "IsNaN"):
            return TensorProto.BOOL
        if op == "Cast":
            return attrs["to"]
        if op == "Where":
            return self.types.get(ins[1], 0)
        return self.types.get(ins[0], 0) if ins and ins[0] else 0


def _function_proto(function) -> onnx.FunctionProto:
    import onnx_ir as ir

    if isinstance(function, onnx.FunctionProto):
        return function
    return ir.serde.serialize_function(function)


def to_pointwise(function, captured: Sequence[np.ndarray] = (), *, kind: str = "score_mod",
                 opset: int = 20) -> onnx.GraphProto:
    """The pointwise graph of an exported ``score_mod`` (5 scalar inputs ``score, b, h, q, kv``,
    a float score) or ``mask_mod`` (4 inputs ``b, h, q, kv``, a bool) function, its extra
    inputs bound to ``captured`` constants.  A mask_mod gives ``Where(mask, score, -inf)``.

    ``function`` is an onnx-ir Function (what torch.onnx passes to a translation) or a
    FunctionProto.  Raises FlexExportError / ScoreModError naming the op that is not pointwise.
    """
    proto = _function_proto(function)
    arity = 5 if kind == "score_mod" else 4
    where = f"flex_attention {kind} {proto.name!r}"
    if len(proto.input) != arity + len(captured):
        raise FlexExportError(f"{where} takes {len(proto.input)} inputs; expected {arity} and "
                              f"{len(captured)} captured tensors")
    s = _Scalarizer(kind, opset)
    names = INPUT_NAMES if kind == "score_mod" else INPUT_NAMES[1:]
    types = INPUT_TYPES if kind == "score_mod" else INPUT_TYPES[1:]
    for name, graph_name, elem_type in zip(proto.input, names, types):
        s.input(name, graph_name, elem_type)
    for name, array in zip(proto.input[arity:], captured):
        s.constant(name, np.asarray(array))
    for node in proto.node:
        s.node(node, where)
    (out,) = proto.output
    if out in s.consts:
        value = s.consts[out]
        if kind == "mask_mod" and value.size == 1 and bool(value.reshape(-1)[0]):
            return None  # everything kept
        result = s.ref(out)
    else:
        result = s.names[out]
    if kind == "mask_mod":
        result = s.g.op("Where", result, "score", s.g.const(_NEG_INF, np.float32))
    elif s.types.get(out) not in (TensorProto.FLOAT, 0):
        result = s.g.op("Cast", result, to=TensorProto.FLOAT)
    graph = s.g.finish(result)
    graph = _prune(graph)
    check(graph, where)
    return graph


def _prune(graph: onnx.GraphProto) -> onnx.GraphProto:
    """Drop the nodes and initializers the output does not need."""
    needed, kept = {graph.output[0].name}, []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(x for x in node.input if x)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return graph


def _constants_of(program) -> dict[str, np.ndarray]:
    """Placeholder name -> value of every parameter, buffer and lifted constant of an
    ExportedProgram (what a mod may capture)."""
    if program is None:
        return {}
    signature = program.graph_signature
    tensors = {**dict(program.named_parameters()), **dict(program.named_buffers()), **program.constants}
    out = {}
    for placeholder, name in (*signature.inputs_to_parameters.items(), *signature.inputs_to_buffers.items(),
                              *signature.inputs_to_lifted_tensor_constants.items()):
        tensor = tensors.get(name)
        if tensor is not None:
            out[placeholder] = tensor.detach().cpu().numpy()
    return out


def _constant_of(value, known: dict[str, np.ndarray], where: str) -> np.ndarray:
    array = getattr(value, "const_value", None)
    if array is not None:
        return np.asarray(array.numpy())
    name = getattr(value, "name", None)
    if name in known:
        return known[name]
    hint = ("" if known else " (torch.onnx only gives the values of captured tensors to a translation through "
            "onnxgen.export.flex.export, or translation_table(exported_program))")
    raise FlexExportError(f"{where}: the tensor it captures ({name!r}) is not a constant of the program{hint}; "
                          "score/mask mods may read constant tables only (buffers, parameters, tensors built "
                          "outside forward)")


# ---- the translation ------------------------------------------------------------------------

def _flex_attention(query, key, value, score_mod, block_mask, scale, kernel_options=None,
                    score_mod_other_buffers=(), mask_mod_other_buffers=(), *, _known=None):
    import onnx_ir as ir
    from torch.onnx._internal.exporter import _core

    kernel_options = dict(kernel_options or {})
    if kernel_options.get("OUTPUT_LOGSUMEXP") or kernel_options.get("OUTPUT_MAX"):
        raise FlexExportError("flex_attention with return_lse / return_aux: FlexAttention has no logsumexp "
                              "output; call it without them")
    tracer = _core.current_tracer
    opset = tracer.opset.version
    known = _known or {}
    score_buffers = [_constant_of(b, known, "flex_attention score_mod") for b in score_mod_other_buffers or ()]
    mask_buffers = [_constant_of(b, known, "flex_attention mask_mod") for b in mask_mod_other_buffers or ()]
    mods = []
    pointwise = to_pointwise(score_mod, score_buffers, kind="score_mod", opset=opset)
    if not (len(pointwise.node) == 1 and pointwise.node[0].op_type == "Identity"
            and pointwise.node[0].input[0] == "score"):
        mods.append(pointwise)
    mask_mod = block_mask[-1] if block_mask else None
    if mask_mod is not None:
        masked = to_pointwise(mask_mod, mask_buffers, kind="mask_mod", opset=opset)
        if masked is not None:
            mods.append(masked)
    attributes = [ir.AttrFloat32("scale", float(scale))] if scale is not None else []
    if mods:
        mod = mods[0] if len(mods) == 1 else sm.compose(*mods)
        whole = _initializers_to_constants(sm.flex_score_mod(mod))
        attributes.append(ir.AttrGraph("score_mod", ir.serde.deserialize_graph(whole)))
    node = ir.Node(FLEX_DOMAIN, "FlexAttention", [query, key, value], attributes, num_outputs=1, version=1)
    tracer.nodes.append(node)
    # flex_attention also returns its logsumexp and max; nothing may read them (checked above),
    # so they are placeholders that the exporter's dead-code elimination drops.
    axes = ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.tensor(np.array([-1], np.int64)))], num_outputs=1,
                   version=opset)
    tracer.nodes.extend([axes])
    placeholder = ir.Node("", "ReduceMax", [query, axes.outputs[0]], [ir.AttrInt64("keepdims", 0)], num_outputs=1,
                          version=opset)
    tracer.nodes.append(placeholder)
    return node.outputs[0], placeholder.outputs[0], placeholder.outputs[0]


def _initializers_to_constants(graph: onnx.GraphProto) -> onnx.GraphProto:
    """Constants as Constant nodes: torch.onnx lifts a subgraph's initializers into the main
    graph, which leaves the score_mod reading outer-scope values."""
    constants = [helper.make_node("Constant", [], [t.name], name=f"{t.name}_constant", value=t) for t in graph.initializer]
    nodes = constants + list(graph.node)
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(nodes)
    return graph


def translation_table(exported_program=None) -> dict[Callable, Callable]:
    """``custom_translation_table`` entries for ``torch.onnx.export(..., dynamo=True)``.

    Mods that read captured tensors (an ALiBi slope table, say) need their values, which
    torch.onnx sets only after translating: pass the ``torch.export.ExportedProgram`` that is
    exported (``export`` does)."""
    import torch

    known = _constants_of(exported_program)

    def flex_attention(*args, **kwargs):
        return _flex_attention(*args, **kwargs, _known=known)

    return {torch.ops.higher_order.flex_attention: flex_attention}


@contextlib.contextmanager
def constant_default_block_mask():
    """flex_attention without a BlockMask builds one in forward (vmap, argsort: not exportable);
    the default mask does not depend on the inputs, so it is built once, eagerly, and captured
    as constants while torch.export traces."""
    import torch.nn.attention.flex_attention as fa

    original = fa._create_empty_block_mask
    empty = original(torch_empty(), torch_empty())
    fa._create_empty_block_mask = lambda query, key: empty
    try:
        yield
    finally:
        fa._create_empty_block_mask = original


def torch_empty():
    import torch

    return torch.empty(0)


def export(module, args: tuple, path: str | None = None, *, opset_version: int = DEFAULT_OPSET,
           custom_translation_table: dict | None = None, **kwargs: Any) -> onnx.ModelProto:
    """``torch.onnx.export(module, args, dynamo=True)`` with flex_attention lowered to FlexAttention;
    returns the ModelProto (and saves it to ``path`` when given)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention without torch.compile; opset conversions
        if isinstance(module, torch.export.ExportedProgram):
            exported = module
        else:
            with constant_default_block_mask():
                exported = torch.export.export(module, tuple(args), dynamic_shapes=kwargs.pop("dynamic_shapes", None))
        table = {**translation_table(exported), **(custom_translation_table or {})}
        program = torch.onnx.export(exported, tuple(args), dynamo=True, opset_version=opset_version,
                                    custom_translation_table=table, **kwargs)
    model = own_constants(program.model_proto)
    if path is not None:
        onnx.save(model, path)
    return model


def own_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move the constants each FlexAttention ``score_mod``/``prob_mod`` reads from the main graph
    back into it (torch.onnx's optimizer lifts subgraph constants into the main graph; onnxgen's
    passes and the op's expansion want self-contained score graphs).  In place; returns ``model``.
    Call it on a model exported with ``torch.onnx.export`` and ``translation_table`` directly."""
    main = {t.name: t for t in model.graph.initializer}
    moved = set()
    for node in model.graph.node:
        if node.domain != FLEX_DOMAIN or node.op_type != "FlexAttention":
            continue
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            graph = attr.g
            local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
            local |= {o for n in graph.node for o in n.output}
            for name in dict.fromkeys(x for n in graph.node for x in n.input if x and x not in local):
                if name in main:
                    graph.initializer.append(main[name])
                    moved.add(name)
    if moved:
        def names(graph):  # every name read in graph and its subgraphs
            for n in graph.node:
                yield from n.input
                for a in n.attribute:
                    for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                        local = {t.name for t in g.initializer}
                        yield from (x for x in names(g) if x not in local)
        used = set(names(model.graph)) | {o.name for o in model.graph.output}
        keep = [t for t in model.graph.initializer if t.name not in moved or t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return model


def score_mod_graph(score_mod: Callable | None = None, mask_mod: Callable | None = None, *, num_heads: int = 1,
                    batch: int = 1) -> onnx.GraphProto:
    """PagedAttention's ``score_mod`` (a pointwise graph) from PyTorch ``score_mod`` and/or
    ``mask_mod`` functions, traced through the exporter as in ``export``.

    ``num_heads``/``batch``: sizes of the small probe call that the tracing runs (tables the
    mods index by head or batch must cover them).  Raises the errors of ``to_pointwise``.
    """
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    length = 128
    block_mask = create_block_mask(mask_mod, batch, num_heads, length, length, device="cpu") if mask_mod else None

    class Probe(torch.nn.Module):
        def forward(self, q, k, v):
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    q = torch.zeros(batch, num_heads, length, 8)
    model = export(Probe(), (q, q, q))
    node = next(n for n in model.graph.node if n.op_type == "FlexAttention")
    whole = next((a.g for a in node.attribute if a.name == "score_mod"), None)
    if whole is None:
        return sm._Graph("identity").finish("score")
    graph, reason = sm.pointwise_of(whole)
    if graph is None:
        raise ScoreModError(f"score_mod_graph: {reason}")
    return graph
