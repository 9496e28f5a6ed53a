"""compile_score_mods: PagedAttention's score_mod graph -> a bytecode the CPU kernel interprets.

onnxruntime's custom-op API cannot read GRAPH attributes, so for the kernel path each
PagedAttention node's pointwise ``score_mod`` is compiled into two plain attributes the kernel
reads, and the graph attribute is dropped from the node the runtime sees (the model file keeps
it):

- ``score_program`` (ints): ``[MAGIC, VERSION, num_registers, num_instructions]``, then
  ``num_instructions`` records of 5 ints ``opcode, dst, a, b, c``, then the integer tables;
- ``score_constants`` (floats): the float tables (and nothing else; float immediates are
  stored as their bits in the instruction).

Registers hold float32 (``F``) or integer (``I``: int32 and int64 alike computed in 32 bits,
where AVX2 vectorises them; booleans are 0/1) values; integer constants and tables outside the
int32 range are not compiled.  Registers 0-4 are the inputs ``score`` (F), ``batch``, ``head``, ``q_pos`` and ``kv_pos`` (I).
The kernel runs the program once per head and cache block over the scores of a whole tile of
query rows (masked ones too), or, when it can fail (an integer division, a Gather whose index
varies with the positions), once per query row, head and block over the visible ones;
``batch`` and ``head`` are uniform there, and a register that depends only on uniform inputs and
constants (ALiBi's slope) is computed once (length 1) and broadcast.  A window the graph's final mask implies also becomes the node's
``local_window_size`` (``with_program``), so the kernel skips the blocks it hides.  Every instruction's types are
fixed here, so the interpreter never checks a type while it runs.

Graphs using a pointwise op that has no opcode (Erf, Mod, Round, …) are not compiled: the node
keeps its graph and is expanded into its function body, with a warning naming the op.
Graphs that break the score_mod contract raise ``ScoreModError`` naming the node and the op.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..ops.domain import DOMAIN
from ..ops.flex_score import ScoreModError, check, constant_arrays

MAGIC, VERSION = 0x53434F52, 1  # "SCOR"
PROGRAM_ATTR, CONSTANTS_ATTR = "score_program", "score_constants"

# Opcodes: keep in step with kernels/csrc/score_program.h.
OPCODES = {name: i for i, name in enumerate("""
    CONST_F CONST_I COPY_F COPY_I
    ADD_F SUB_F MUL_F DIV_F MIN_F MAX_F POW_F
    ADD_I SUB_I MUL_I DIV_I MIN_I MAX_I
    NEG_F ABS_F TANH_F EXP_F LOG_F SQRT_F FLOOR_F CEIL_F RECIP_F SIGMOID_F RELU_F
    NEG_I ABS_I
    LT_F LE_F GT_F GE_F EQ_F LT_I LE_I GT_I GE_I EQ_I
    AND OR XOR NOT
    WHERE_F WHERE_I
    F2I I2F I2B F2B
    GATHER_F GATHER_I
""".split())}

_FLOAT, _INT, _BOOL = "F", "I", "B"
_KIND = {TensorProto.FLOAT: _FLOAT, TensorProto.INT32: _INT, TensorProto.INT64: _INT, TensorProto.BOOL: _BOOL}
_FLOAT_BINARY = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Min": "MIN", "Max": "MAX", "Pow": "POW"}
_UNARY = {"Neg": "NEG", "Abs": "ABS", "Tanh": "TANH", "Exp": "EXP", "Log": "LOG", "Sqrt": "SQRT", "Floor": "FLOOR",
          "Ceil": "CEIL", "Reciprocal": "RECIP", "Sigmoid": "SIGMOID", "Relu": "RELU"}
_COMPARE = {"Less": "LT", "LessOrEqual": "LE", "Greater": "GT", "GreaterOrEqual": "GE", "Equal": "EQ"}


class Unsupported(Exception):
    """A valid score graph with an op (or type) the bytecode does not have."""


@dataclass
class CompiledScore:
    program: np.ndarray    # int64
    constants: np.ndarray  # float32


def _int32(array: np.ndarray) -> None:
    if array.size and (array.min() < -2**31 or array.max() >= 2**31):
        raise Unsupported("an integer constant outside the int32 range")


class _Compiler:
    def __init__(self):
        self.code: list[list[int]] = []
        self.kinds: list[str] = [_FLOAT, _INT, _INT, _INT, _INT]
        self.int_tables: list[int] = []
        self.float_tables: list[float] = []

    def emit(self, opcode: str, kind: str, a=0, b=0, c=0) -> int:
        dst = len(self.kinds)
        self.kinds.append(kind)
        self.code.append([OPCODES[opcode], dst, a, b, c])
        return dst

    def const(self, array: np.ndarray) -> int:
        value = array.reshape(-1)[0]
        if array.dtype == np.float32:
            return self.emit("CONST_F", _FLOAT, struct.unpack("<i", struct.pack("<f", float(value)))[0])
        if array.dtype in (np.int32, np.int64):
            _int32(array)
            return self.emit("CONST_I", _INT, int(value))
        if array.dtype == np.bool_:
            return self.emit("CONST_I", _BOOL, int(bool(value)))
        raise Unsupported(f"a {array.dtype} constant")

    def table(self, array: np.ndarray) -> tuple[str, int, int]:
        if array.dtype == np.float32:
            offset = len(self.float_tables)
            self.float_tables.extend(array.tolist())
            return "GATHER_F", _FLOAT, offset
        if array.dtype in (np.int32, np.int64):
            _int32(array)
            offset = len(self.int_tables)
            self.int_tables.extend(int(x) for x in array)
            return "GATHER_I", _INT, offset
        raise Unsupported(f"Gather from a {array.dtype} table")

    def node(self, node: onnx.NodeProto, regs: list[int]) -> int:
        op, kinds = node.op_type, [self.kinds[r] for r in regs]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if op == "Identity":
            return regs[0]
        if op in ("Min", "Max") and len(regs) != 2:
            if len(regs) == 1:
                return regs[0]
            out = regs[0]
            for r in regs[1:]:
                out = self._binary(op, [out, r], [self.kinds[out], self.kinds[r]])
            return out
        if op == "Clip":
            out = regs[0]
            if len(regs) > 1 and node.input[1]:
                out = self._binary("Max", [out, regs[1]], [self.kinds[out], self.kinds[regs[1]]])
            if len(regs) > 2 and node.input[2]:
                out = self._binary("Min", [out, regs[2]], [self.kinds[out], self.kinds[regs[2]]])
            return out
        if op in _FLOAT_BINARY:
            return self._binary(op, regs, kinds)
        if op in _UNARY:
            if kinds[0] == _FLOAT:
                return self.emit(f"{_UNARY[op]}_F", _FLOAT, regs[0])
            if op in ("Neg", "Abs"):
                return self.emit(f"{_UNARY[op]}_I", _INT, regs[0])
            if op == "Relu":
                return self.emit("MAX_I", _INT, regs[0], self.const(np.array(0, np.int64)))
            raise Unsupported(f"{op} on integers")
        if op in _COMPARE:
            suffix = "F" if kinds[0] == _FLOAT else "I"
            return self.emit(f"{_COMPARE[op]}_{suffix}", _BOOL, regs[0], regs[1])
        if op in ("And", "Or", "Xor"):
            return self.emit(op.upper(), _BOOL, regs[0], regs[1])
        if op == "Not":
            return self.emit("NOT", _BOOL, regs[0])
        if op == "Where":
            kind = kinds[1]
            return self.emit("WHERE_F" if kind == _FLOAT else "WHERE_I", kind, regs[0], regs[1], regs[2])
        if op == "Cast":
            to = _KIND.get(attrs["to"])
            if to is None:
                raise Unsupported(f"Cast to {TensorProto.DataType.Name(attrs['to'])}")
            src = kinds[0]
            if src == to or (src == _INT and to == _INT):
                return regs[0]
            if to == _FLOAT:
                return self.emit("I2F", _FLOAT, regs[0])  # ints and bools alike
            if to == _INT:
                return self.emit("F2I", _INT, regs[0]) if src == _FLOAT else regs[0]
            return self.emit("F2B" if src == _FLOAT else "I2B", _BOOL, regs[0])
        raise Unsupported(op)

    def _binary(self, op, regs, kinds):
        if kinds[0] == _FLOAT:
            return self.emit(f"{_FLOAT_BINARY[op]}_F", _FLOAT, regs[0], regs[1])
        if op == "Pow":
            raise Unsupported("Pow on integers")
        return self.emit(f"{_FLOAT_BINARY[op]}_I", _INT, regs[0], regs[1])


def compile_graph(graph: onnx.GraphProto, where: str = "PagedAttention", opset: int = 25) -> CompiledScore:
    """Compile a score graph; ScoreModError when it is invalid, Unsupported when it has no bytecode."""
    check(graph, where, opset)
    constants = constant_arrays(graph)
    c = _Compiler()
    regs = {v.name: i for i, v in enumerate(graph.input)}
    tables = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    for name, array in constants.items():
        if name not in tables and name not in regs:
            regs[name] = c.const(array)
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        if node.op_type == "Gather":
            opcode, kind, offset = c.table(constants[node.input[0]])
            regs[node.output[0]] = c.emit(opcode, kind, regs[node.input[1]], offset, constants[node.input[0]].size)
            continue
        if node.op_type == "CastLike" or node.op_type not in _SUPPORTED:
            raise Unsupported(node.op_type)
        regs[node.output[0]] = c.node(node, [regs[x] if x else -1 for x in node.input])
    out = regs[graph.output[0].name]
    if c.kinds[out] != _FLOAT:
        raise ScoreModError(f"{where}: score_mod output is not float")
    if out < 5 or c.code[-1][1] != out:
        out = c.emit("COPY_F", _FLOAT, out)  # the result is the last instruction's register
    header = [MAGIC, VERSION, len(c.kinds), len(c.code)]
    program = np.array(header + [x for ins in c.code for x in ins] + c.int_tables, np.int64)
    return CompiledScore(program, np.array(c.float_tables, np.float32))


_SUPPORTED = frozenset(set(_FLOAT_BINARY) | set(_UNARY) | set(_COMPARE) | {
    "And", "Or", "Xor", "Not", "Where", "Cast", "Identity", "Clip", "Gather", "Constant"})


@dataclass
class Masks:
    """What a score graph's final ``Where(keep, x, -inf)`` layers say: ``kv <= q`` among
    ``keep``'s conjuncts is causal, ``kv >= q - W`` a window of W (-1: none).  ``kept`` names the
    value under the outer layers whose conjuncts are all such bounds (the kernel's is_causal /
    local_window_size can mask alone), None when the outermost has another conjunct."""
    causal: bool = False
    window: int = -1
    kept: str | None = None


def implied_masks(graph: onnx.GraphProto) -> Masks:
    """The masks of ``graph``'s final ``Where(keep, x, -inf)`` (see ``Masks``)."""
    producer = {o: n for n in graph.node for o in n.output}
    constants = constant_arrays(graph)

    def through(name):  # follow Identity and integer Casts back to a graph input
        node = producer.get(name)
        while node is not None and (node.op_type == "Identity" or (
                node.op_type == "Cast" and helper.get_attribute_value(node.attribute[0]) in
                (TensorProto.INT32, TensorProto.INT64))):
            name = node.input[0]
            node = producer.get(name)
        return name

    def bounds(node):  # ("causal", None) or ("window", W) for a bound conjunct, else None
        if node is None or len(node.input) != 2:
            return None
        a, b = (through(x) for x in node.input)
        if (node.op_type, a, b) in (("LessOrEqual", "kv_pos", "q_pos"), ("GreaterOrEqual", "q_pos", "kv_pos")):
            return "causal", None
        if node.op_type == "GreaterOrEqual" and a == "kv_pos":
            sub = producer.get(b)
            if sub is not None and sub.op_type == "Sub" and through(sub.input[0]) == "q_pos":
                w = constants.get(sub.input[1])
                if w is not None and w.size == 1 and w.dtype.kind == "i" and int(w.reshape(-1)[0]) >= 0:
                    return "window", int(w.reshape(-1)[0])
        return None

    # Peel Where(keep, x, -inf) layers from the output (a composition of masks is one per mod).
    masks, name = Masks(), graph.output[0].name
    while True:
        out = producer.get(through(name))
        if out is None or out.op_type != "Where":
            break
        other = constants.get(out.input[2])
        if other is None or other.size != 1 or not np.isneginf(other.reshape(-1)[0]):
            break
        conjuncts, stack = [], [out.input[0]]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.op_type == "And":
                stack.extend(node.input)
            else:
                conjuncts.append(node)  # None: a graph input or a constant, no bound
        found = [bounds(node) for node in conjuncts]
        for kind, w in filter(None, found):
            if kind == "causal":
                masks.causal = True
            else:
                masks.window = w if masks.window < 0 else min(masks.window, w)
        if None in found:  # a conjunct that is neither bound: the program keeps this mask
            break
        masks.kept = name = out.input[1]
    return masks


def _computing(graph: onnx.GraphProto, name: str) -> onnx.GraphProto:
    """A copy of ``graph`` whose output is ``name``, with the nodes it does not need dropped."""
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack = set(), [name]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(x for x in node.input if x)
    rest = onnx.GraphProto()
    rest.CopyFrom(graph)
    del rest.node[:]
    rest.node.extend(n for n in graph.node if id(n) in needed)
    rest.output[0].name = name
    return rest


def kernel_program(graph: onnx.GraphProto, where: str = "PagedAttention", opset: int = 25) -> CompiledScore | None:
    """The bytecode the kernel runs for a score graph (the whole graph is checked: same errors as
    ``compile_graph``).  Where the final mask is made of causal and window bounds only, the
    kernel applies them itself (``with_program`` / ``flex_kernel`` set is_causal and
    local_window_size, and the kernel skips the blocks they hide) and the program computes only
    what the mask keeps: None where that is the score itself (a plain mask)."""
    rest = _unmasked(graph)
    if rest is None:
        return compile_graph(graph, where, opset)
    check(graph, where, opset)  # the masks keep the score_mod contract too
    return None if _is_the_score(rest) else compile_graph(rest, where, opset)


def plain_mask(graph: onnx.GraphProto) -> bool:
    """Whether ``graph`` is only causal and window bounds on the score as it came (no program)."""
    rest = _unmasked(graph)
    return rest is not None and _is_the_score(rest)


def _unmasked(graph: onnx.GraphProto) -> onnx.GraphProto | None:
    """``graph`` without its final causal/window mask layers, or None where it has none to drop."""
    kept = implied_masks(graph).kept
    return None if kept is None else _computing(graph, kept)


def _is_the_score(graph: onnx.GraphProto) -> bool:
    return all(n.op_type == "Identity" for n in graph.node)


def with_program(node: onnx.NodeProto, compiled: CompiledScore | None) -> None:
    """Replace ``node``'s score_mod graph by the kernel's form, in place: ``compiled``
    (``kernel_program``: None for a plain mask), and the bounds of the graph's final mask as
    attributes, is_causal = 1 for ``kv <= q`` and ``local_window_size`` (the smaller of the two
    where the node has one) for ``kv >= q - W``, so that the kernel skips the blocks they hide.
    Same result where the program still masks them.  A 1024-token prefill with a 256 window
    does half the work."""
    mod = next(a for a in node.attribute if a.name == "score_mod")
    masks = implied_masks(mod.g)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    dropped = ("score_mod", PROGRAM_ATTR, CONSTANTS_ATTR, "local_window_size", "is_causal")
    kept = [a for a in node.attribute if a.name not in dropped]
    del node.attribute[:]
    node.attribute.extend(kept)
    causal = int(attrs.get("is_causal", 1)) or int(masks.causal)
    window = int(attrs.get("local_window_size", -1))
    if masks.window >= 0:
        window = masks.window if window < 0 else min(window, masks.window)
    node.attribute.append(helper.make_attribute("is_causal", causal))
    node.attribute.append(helper.make_attribute("local_window_size", window))
    if compiled is not None:
        node.attribute.append(helper.make_attribute(PROGRAM_ATTR, compiled.program.tolist()))
        if compiled.constants.size:
            node.attribute.append(helper.make_attribute(CONSTANTS_ATTR, compiled.constants.tolist()))


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name or node.output[0]!r}"


def compile_score_mods(model: onnx.ModelProto, *, to_bytecode: bool = True) -> onnx.ModelProto:
    """Check every PagedAttention node's score_mod and (``to_bytecode``) replace it by its bytecode.

    Returns a copy; raises ScoreModError naming the node and the op for a bad score graph;
    warns and keeps the graph (for the expansion) where an op has no bytecode.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 25)
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    graphs = [model_copy.graph] + [f for f in model_copy.functions]
    for graph in graphs:
        for node in graph.node:
            if node.domain != DOMAIN or node.op_type != "PagedAttention":
                continue
            mod = next((a for a in node.attribute if a.name == "score_mod"), None)
            if mod is None:
                continue
            where = f"PagedAttention node {node.name or node.output[0]!r}"
            if not to_bytecode:
                check(mod.g, where, opset)
                continue
            try:
                compiled = kernel_program(mod.g, where, opset)
            except Unsupported as reason:
                warnings.warn(f"{where}: score_mod uses {reason}, which onnxgen's kernel cannot run compiled; "
                              "this node runs as its expanded function body (slow)", stacklevel=3)
                continue
            with_program(node, compiled)
    return model_copy
