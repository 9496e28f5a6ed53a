"""onnxgen-kernels blobs of format ``onnxgen.kernels.programs``: a scope's attention nodes with
their score programs compiled, ready for onnxgen's kernel library.

What a session of onnxgen's kernels does to a model before it runs (``backends.ort_session``,
``onnxgen.backends.ort.session``): every PagedAttention ``score_mod`` graph is compiled to the
bytecode the kernel interprets (``passes.compile_score_mod``), and every FlexAttention node
whose score_mod is pointwise is rewritten onto the PagedAttention kernel
(``passes.flex_kernel``: shape inference of the whole model, the pointwise graph recovered,
compiled).  This blob holds the result per node, so a load uses it instead of compiling:

    {"format": "onnxgen.kernels.programs", "version": 1,
     "scope_hash": "sha256:…",          # the scope it was made from (the manifest's hash)
     "kernels_sha256": "…",             # the kernel library that interprets the programs
     "compiler": "score_program/1 sha256:…",   # the compiler's sources (see compiler_id)
     "nodes": [
       {"index": 0, "op_type": "PagedAttention", "outputs": [...],
        "program": [ints], "constants": [floats]},
       {"index": 3, "op_type": "FlexAttention", "outputs": ["Y"],
        "plan": {"num_heads": 8, "head_size": 64, "kv_num_heads": 2, "v_head_size": 64,
                 "elem_type": 1, "is_causal": 1, "local_window_size": 63},
        "program": [ints] or null, "constants": [floats]}]}

``index`` is the node's place among the scope's nodes (graph order); nodes not listed (no
score_mod, or one with an op the bytecode lacks) are left as they are.  It is data, no machine
code: the programs are read by the kernel library installed here, which checks each program
when the session is created (header, opcodes, register numbers and types, table bounds) and
refuses a bad one; the FlexAttention rewrite is emitted by this onnxgen's code from the plan's
numbers, after the sizes are checked against the model's own shapes.  So a programs blob needs
no ``allow_native_code`` (a kernel-library blob, format ``onnxgen.kernels.library``, still does).

A blob is refused (``ContextError``, the loader warns and compiles from the graph) when it was
made for another scope content, another build of the kernel library, or another compiler, when
a listed node does not match the scope's node, or when a FlexAttention plan's sizes differ from
the shapes the model gives its inputs now.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..ops.domain import DOMAIN
from .format import ContextError

FORMAT = "onnxgen.kernels.programs"
LIBRARY_FORMAT = "onnxgen.kernels.library"
VERSION = 1
_PLAN_FIELDS = ("num_heads", "head_size", "kv_num_heads", "v_head_size", "elem_type", "is_causal",
                "local_window_size")


@functools.lru_cache(maxsize=None)
def compiler_id() -> str:
    """The score compiler's identity: the bytecode version and a digest of the sources that make
    programs and plans (compile_score_mod, flex_kernel, and the score-graph checks and pointwise
    recovery they use).  Any edit to them makes older blobs stale (conservatively: a change that
    does not alter programs does too)."""
    from ..ops import flex_score, score_mods
    from ..passes import compile_score_mod, flex_kernel

    h = hashlib.sha256()
    for module in (compile_score_mod, flex_kernel, flex_score, score_mods):
        h.update(Path(module.__file__).read_bytes())
    return f"score_program/{compile_score_mod.VERSION} sha256:{h.hexdigest()[:16]}"


def _is_flex(node: onnx.NodeProto) -> bool:
    return node.domain == "ai.onnx.preview" and node.op_type == "FlexAttention"


def _score_mod(node: onnx.NodeProto):
    return next((a for a in node.attribute if a.name == "score_mod"), None)


def has_programs(sub: onnx.ModelProto) -> bool:
    """Whether the scope has anything a programs blob could hold (before trying to compile it)."""
    return any(_is_flex(n) or (n.domain == DOMAIN and n.op_type == "PagedAttention" and _score_mod(n) is not None)
               for n in sub.graph.node)


def _needs_no_program(flex: onnx.NodeProto) -> bool:
    """A FlexAttention node without score_mod, or with one that is only causal / window bounds."""
    from ..ops.score_mods import pointwise_of
    from ..passes import compile_score_mod as csm

    mod = _score_mod(flex)
    if mod is None:
        return True
    pointwise, _ = pointwise_of(mod.g)
    return pointwise is not None and csm.plain_mask(pointwise)


def make(sub: onnx.ModelProto, *, scope_hash: str, kernels_sha256: str) -> bytes:
    """The payload for the scope ``sub`` (its standalone model, nodes in the scope's order).

    ContextError when nothing in it compiles (no score_mod the bytecode can take and no
    FlexAttention the kernel can run) or a score_mod breaks the score_mod contract."""
    from ..ops.flex_score import ScoreModError
    from ..passes import compile_score_mod as csm
    from ..passes import flex_kernel

    opset = next((o.version for o in sub.opset_import if o.domain in ("", "ai.onnx")), 25)
    infos = None
    entries = []
    for index, node in enumerate(sub.graph.node):
        entry = {"index": index, "op_type": node.op_type, "outputs": list(node.output)}
        if node.domain == DOMAIN and node.op_type == "PagedAttention" and _score_mod(node) is not None:
            where = f"PagedAttention node {node.name or node.output[0]!r}"
            try:
                compiled = csm.kernel_program(_score_mod(node).g, where, opset)
            except csm.Unsupported as reason:
                warnings.warn(f"{where}: score_mod uses {reason}, which onnxgen's kernel cannot run compiled; "
                              "not in the blob (it runs as its expanded function body)", stacklevel=3)
                continue
            except ScoreModError as error:
                raise ContextError(str(error)) from None
        elif _is_flex(node):
            if infos is None:
                inferred = onnx.shape_inference.infer_shapes(sub)
                infos = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.input,
                                             *inferred.graph.output]}
            plan = flex_kernel.plan_rewrite(node, infos, stacklevel=3)
            if plan is None:
                continue
            entry["plan"] = {f: int(getattr(plan, f)) for f in _PLAN_FIELDS}
            compiled = plan.program
        else:
            continue
        entry["program"] = None if compiled is None else [int(x) for x in compiled.program]
        entry["constants"] = [] if compiled is None else [float(x) for x in compiled.constants]
        entries.append(entry)
    if not entries:
        raise ContextError("the scope has no score_mod the kernel runs compiled and no FlexAttention it runs: "
                           "nothing for a programs blob")
    doc = {"format": FORMAT, "version": VERSION, "scope_hash": scope_hash, "kernels_sha256": kernels_sha256,
           "compiler": compiler_id(), "nodes": entries}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


@dataclass
class Inline:
    """What replaces a scope's nodes in the onnxruntime session that runs it with the rest of the
    model: per node (its index among the scope's nodes) the nodes that stand for it; the
    constants they add; the opsets they need."""

    replacements: dict[int, list[onnx.NodeProto]]
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    opsets: dict[str, int] = field(default_factory=dict)


def _ints(value, what: str) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ContextError(f"{what} is not a list of integers")
    if value and (min(value) < -2**63 or max(value) >= 2**63):
        raise ContextError(f"{what} has an integer outside int64")
    return np.asarray(value, np.int64)


def _floats(value, what: str) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              and math.isfinite(x) for x in value):
        raise ContextError(f"{what} is not a list of finite numbers")
    return np.asarray(value, np.float32)


def read(payload: bytes, nodes: list[onnx.NodeProto], *, scope_hash: str, kernels_sha256: str | None,
         infos: Callable[[], dict], taken: Callable[[], set[str]], prefix: str) -> Inline:
    """The replacements a programs payload gives the scope's ``nodes``; ContextError saying why
    when the payload is not for them, this library or this compiler.

    ``infos()``: value infos of the model's values (for the FlexAttention sizes); ``taken()``: the
    value names the model uses (new names must not collide); ``prefix``: of every new name."""
    from ..passes import compile_score_mod as csm
    from ..passes import flex_kernel

    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ContextError(f"the programs payload is not JSON: {error}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ContextError(f"the payload is not {FORMAT}")
    if doc.get("version") != VERSION:
        raise ContextError(f"programs payload version {doc.get('version')!r} (this onnxgen reads {VERSION})")
    if doc.get("scope_hash") != scope_hash:
        raise ContextError(f"the programs were made for scope content {doc.get('scope_hash')}, not {scope_hash}")
    if kernels_sha256 is None:
        raise ContextError("this onnxgen has no built kernel library to run the programs")
    if doc.get("kernels_sha256") != kernels_sha256:
        raise ContextError("the programs were made for another build of onnxgen's kernel library "
                           f"(sha256 {str(doc.get('kernels_sha256'))[:12]}…, this one {kernels_sha256[:12]}…)")
    if doc.get("compiler") != compiler_id():
        raise ContextError(f"the programs were made by another score compiler ({doc.get('compiler')}; "
                           f"this onnxgen: {compiler_id()})")
    entries = doc.get("nodes")
    if not isinstance(entries, list) or not entries:
        raise ContextError("the programs payload lists no nodes")
    inline = Inline({})
    for entry in entries:
        if not isinstance(entry, dict):
            raise ContextError("a node entry is not an object")
        index = entry.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(nodes):
            raise ContextError(f"node index {index!r} is not one of the scope's {len(nodes)} nodes")
        if index in inline.replacements:
            raise ContextError(f"node {index} is listed twice")
        node = nodes[index]
        label = f"node {index} ({node.op_type} {node.name or node.output[0]!r})"
        if entry.get("op_type") != node.op_type or entry.get("outputs") != list(node.output):
            raise ContextError(f"{label}: the blob lists {entry.get('op_type')} with outputs {entry.get('outputs')}")
        raw = entry.get("program")
        program = None if raw is None else csm.CompiledScore(_ints(raw, f"{label}: program"),
                                                             _floats(entry.get("constants", []), f"{label}: constants"))
        if program is not None and (len(program.program) < 4 or program.program[0] != csm.MAGIC
                                    or program.program[1] != csm.VERSION):
            raise ContextError(f"{label}: not a version-{csm.VERSION} score program")
        if node.domain == DOMAIN and node.op_type == "PagedAttention":
            if _score_mod(node) is None or (program is None) != csm.plain_mask(_score_mod(node).g):
                raise ContextError(f"{label}: a program for a node without score_mod, or none for one that needs it")
            new = onnx.NodeProto()
            new.CopyFrom(node)
            csm.with_program(new, program)
            inline.replacements[index] = [new]
        elif _is_flex(node):
            raw_plan = entry.get("plan")
            if not isinstance(raw_plan, dict) or set(raw_plan) != set(_PLAN_FIELDS) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in raw_plan.values()):
                raise ContextError(f"{label}: the plan must give the integers {', '.join(_PLAN_FIELDS)}")
            plan = flex_kernel.FlexPlan(**raw_plan, program=program)
            if (program is None) != _needs_no_program(node) or not flex_kernel.rewritable(node):
                raise ContextError(f"{label}: the plan does not fit the node (score_mod, prob_mod, precision)")
            sizes = flex_kernel.static_sizes(node, infos())
            want = (plan.elem_type, plan.num_heads, plan.head_size, plan.kv_num_heads, plan.v_head_size)
            if sizes != want:
                raise ContextError(f"{label}: made for (type, heads, head size, kv heads, v head size) {want}, "
                                   f"the model's shapes give {sizes}")
            if plan.is_causal not in (0, 1) or plan.local_window_size < -1:
                raise ContextError(f"{label}: is_causal {plan.is_causal}, local_window_size {plan.local_window_size}")
            new_nodes, constants = flex_kernel.emit_rewrite(node, plan, f"{prefix}/{index}")
            made = {o for n in new_nodes for o in n.output if o} - set(node.output)
            clash = sorted((made | {t.name for t in constants}) & taken())
            if clash:
                raise ContextError(f"{label}: the rewrite's names {clash[:3]} are already used in the model")
            inline.replacements[index] = new_nodes
            inline.initializers.extend(constants)
            inline.opsets[DOMAIN] = 1
        else:
            raise ContextError(f"{label}: neither PagedAttention nor FlexAttention")
    return inline
