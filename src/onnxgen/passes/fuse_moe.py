"""fuse_moe: torch-exported mixture-of-experts blocks -> ``onnxgen.preview.MoE``.

The pattern is what ``torch.onnx.export(dynamo=True)`` makes of a Hugging Face sparse-MoE block
whose experts run with ``model.set_experts_implementation("batched_mm")`` (the eager experts
loop does not export: it branches on ``nonzero``).  Per token, with the router projection
left outside (it stays a MatMul/Gemm, as the MoE op wants):

    probs = Softmax(router_logits)            or  values, ids = TopK(router_logits); Softmax(values)
    values, ids = TopK(probs, k)
    weights = values / ReduceSum(values)      (optional: the family renormalises the k weights)
    x_k = x repeated k times                  (Unsqueeze, Expand, Reshape: repeat_interleave)
    h = gate_up[ids] @ x_k                    (Gather or GatherND of the expert weights, a batched MatMul)
    a = silu(gate) * up                       (Split of h in halves: gate first)
    y = down[ids] @ a
    Y = ReduceSum((y * weights) as [T, k, H], axis 1)

and it becomes ``MoE(x, router_logits, gate_up_weights, down_weights, k=k, normalize=...)``
with the expert weights transposed once into the op's ``[E, H, 2I]`` / ``[E, I, H]`` layout.
Shared experts (Qwen2-MoE) are ordinary MLPs beside the block and stay as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from ..ops.domain import DOMAIN, DOMAIN_VERSION


class MoEFusionError(ValueError):
    """fuse_moe was asked to fuse (``require=True``) and found nothing; the message says why."""


class BatchedExperts(pattern.RewriteRuleClassBase):
    """One routed-experts block as torch.onnx exports transformers' ``batched_mm`` experts."""

    def __init__(self, name: str, failures: list[str], gather: str):
        super().__init__(name)
        self.failures, self.gather = failures, gather

    def _select(self, op, weights, ids):
        if self.gather == "GatherND":
            return op.GatherND(weights, op.Unsqueeze(ids, pattern.ANY_VALUE), batch_dims=0)
        return op.Gather(weights, ids, axis=0)

    def pattern(self, op, x, router_logits, k, gate_up, down):
        top_first_values, top_first_ids = op.TopK(router_logits, k, axis=-1, largest=1, _outputs=2,
                                                  _allow_other_attributes=True)
        probs = op.Softmax(router_logits, axis=-1)
        values, ids = op.TopK(probs, k, axis=-1, largest=1, _outputs=2, _allow_other_attributes=True)
        chosen = pattern.OrValue([values, op.Softmax(top_first_values, axis=-1)], tag_var="routing",
                                 tag_values=["softmax_topk", "topk_softmax"])
        weights = pattern.OrValue([op.Div(chosen, op.ReduceSum(chosen, pattern.ANY_VALUE, keepdims=1)), chosen],
                                  tag_var="normalize", tag_values=[1, 0])
        flat_ids = op.Reshape(pattern.OrValue([ids, top_first_ids]), pattern.ANY_VALUE)
        x_k = op.Reshape(op.Expand(op.Unsqueeze(x, pattern.ANY_VALUE), pattern.ANY_VALUE), pattern.ANY_VALUE)
        h = op.Squeeze(op.MatMul(self._select(op, gate_up, flat_ids), op.Unsqueeze(x_k, pattern.ANY_VALUE)),
                       pattern.ANY_VALUE)
        gate, up = op.Split(h, _outputs=2, _allow_other_attributes=True)
        act = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
        y = op.Squeeze(op.MatMul(self._select(op, down, flat_ids), op.Unsqueeze(act, pattern.ANY_VALUE)),
                       pattern.ANY_VALUE)
        y = op.Mul(y, op.Unsqueeze(op.Reshape(weights, pattern.ANY_VALUE), pattern.ANY_VALUE))
        return op.ReduceSum(op.Reshape(y, pattern.ANY_VALUE), pattern.ANY_VALUE, keepdims=0)

    def _fail(self, result, reason, *where):
        self.failures.append(reason)
        return result.fail(reason, *where)

    def check(self, context, x, router_logits, k, gate_up, down, routing=None, **_):
        result = pattern.MatchResult()
        k_value = _ir_utils.get_singleton_value(k)
        if not isinstance(k_value, int):
            return self._fail(result, "TopK's k is not a constant", k)
        for name, w in (("gate_up", gate_up), ("down", down)):
            if w.const_value is None or w.shape is None or w.shape.rank() != 3:
                return self._fail(result, f"the {name} expert weights are not a constant [E, out, in] tensor", w)
        e, two_i, hidden = gate_up.shape
        if down.shape[0] != e or down.shape[1] != hidden or two_i != 2 * down.shape[2]:
            return self._fail(result, f"expert weights {list(gate_up.shape)} and {list(down.shape)} are not "
                                      "gate_up [E, 2I, H] and down [E, H, I]")
        split = next(n for n in context.nodes if n.op_type == "Split")
        axis = split.attributes["axis"].as_int() if "axis" in split.attributes else 0
        if axis not in (1, -1) or (len(split.inputs) > 1 and split.inputs[1] is not None and list(
                ir.convenience.get_const_tensor(split.inputs[1]).numpy()) != [two_i // 2] * 2):
            return self._fail(result, "the gate/up split is not two equal halves of the last axis", split.outputs[0])
        topk = {n for n in context.nodes if n.op_type == "TopK"}  # a node matched through both outputs counts once
        if len(topk) != 1:
            return self._fail(result, "routing with more than one TopK")
        if x.dtype != gate_up.dtype:
            return self._fail(result, f"activations ({x.dtype}) and expert weights ({gate_up.dtype}) differ in type")
        self._k = k_value
        return result

    def rewrite(self, op, x, router_logits, gate_up, down, routing="softmax_topk", normalize=0, **_):
        gate_up_t = op.initializer(ir.tensor(np.ascontiguousarray(gate_up.const_value.numpy().transpose(0, 2, 1))),
                                   name=f"{gate_up.name}.moe")
        down_t = op.initializer(ir.tensor(np.ascontiguousarray(down.const_value.numpy().transpose(0, 2, 1))),
                                name=f"{down.name}.moe")
        attributes = {"k": self._k, "normalize": int(normalize), "activation": "silu", "gated": 1}
        if routing == "topk_softmax":
            attributes["softmax_after_topk"] = 1
        return op.MoE(x, router_logits, gate_up_t, None, down_t, _domain=DOMAIN, _version=DOMAIN_VERSION,
                      **attributes)


def fuse_moe(model: onnx.ModelProto | ir.Model, *, require: bool = True, verbose: bool = False) -> onnx.ModelProto:
    """Replace each torch-exported MoE block (module doc) with one ``onnxgen.preview.MoE`` node.

    With ``require`` (default), a model with a TopK but no fused block is an error that lists the
    reasons the candidates were refused; a model without TopK is returned unchanged either way.
    """
    m = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
    failures: list[str] = []
    rules = pattern.RewriteRuleSet([BatchedExperts.rule(f"MoE.{g}", failures, gather=g)
                                    for g in ("GatherND", "Gather")])
    m.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    count = rules.apply_to_model(m, verbose=2 if verbose else None)
    topk = sum(1 for n in ir.traversal.RecursiveGraphIterator(m.graph) if n.op_type == "TopK")
    if require and topk and not count:
        raise MoEFusionError(
            f"fuse_moe: {topk} TopK node(s) but no MoE block matched (router Softmax/TopK, gathered expert "
            "weights and batched MatMuls, silu(gate) * up; export with set_experts_implementation('batched_mm'))"
            + (": " + "; ".join(sorted(set(failures))) if failures else ""))
    if not count:
        m.opset_imports.pop(DOMAIN, None)
    m.metadata_props["onnxgen.fused_moe_blocks"] = str(count)
    return ir.serde.serialize_model(m)
