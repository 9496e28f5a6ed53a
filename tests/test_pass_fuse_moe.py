"""onnxgen.passes.fuse_moe on MoE decoders exported by torch.onnx, against transformers.

Tiny random-weight Mixtral and Qwen2-MoE models (4 experts, top-2; Qwen2-MoE with its
sigmoid-gated shared expert and a dense layer) run their experts with
``set_experts_implementation("batched_mm")`` and are exported with a KV cache by
``torch.onnx.export(dynamo=True, opset_version=23)``.  fuse_moe replaces each block's routing
and expert matmuls by one ``onnxgen.preview.MoE`` node; the paged pass then gives the paged
signature, and the model runs on onnxruntime with onnxgen's kernels: a ragged prefill of three
prompts and 4 decode steps, each step's logits equal to transformers' forward pass within 1e-4
(abs and rel, fp32, logits of order 1).
"""

from __future__ import annotations

import onnx
import pytest

from onnxgen.passes import fuse_moe, paged
from onnxgen.passes.fuse_moe import MoEFusionError

from hf_models import tiny_checkpoint
from torch_export import BLOCK, assert_prefill_and_decode_match, export_torch_onnx

# family -> (number of MoE blocks, MoE attributes the pass must find)
FAMILIES = {"mixtral": (2, {"k": 2, "normalize": 1}), "qwen2_moe": (1, {"k": 2, "normalize": 0})}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    hf = tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), 4321)
    hf.set_experts_implementation("batched_mm")
    return request.param, hf, export_torch_onnx(hf, 23)


def test_fused_model_matches_transformers(exported, rng):
    family, hf, source = exported
    fused = fuse_moe(source)
    blocks, attributes = FAMILIES[family]
    moe = [n for n in fused.graph.node if n.op_type == "MoE"]
    assert len(moe) == blocks
    for node in moe:
        found = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert {k: found.get(k, 0) for k in attributes} == attributes
    kinds = {n.op_type for n in fused.graph.node}
    assert "TopK" not in kinds and "GatherND" not in {n.op_type for n in fused.graph.node if "mlp" in n.name}
    model = paged(fused, block_size=BLOCK)
    onnx.checker.check_model(model, full_check=True)
    assert_prefill_and_decode_match(model, hf, rng, what=family)


@pytest.mark.parametrize("exported", ["mixtral"], indirect=True)  # one form is enough here
def test_unmatched_block_is_a_clear_error(exported):
    family, _, source = exported
    broken = onnx.ModelProto.FromString(source.SerializeToString())
    for node in broken.graph.node:
        if node.op_type == "Sigmoid":  # silu(gate) * up no longer
            node.op_type = "Tanh"
    with pytest.raises(MoEFusionError, match=r"2 TopK node\(s\) but no MoE block matched"):
        fuse_moe(broken)
    assert fuse_moe(broken, require=False).graph.node  # left as it was
