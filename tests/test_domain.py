"""The domain: registered on import, idempotently; the checker and strict inference accept models."""

import subprocess
import sys

import onnx
from onnx import defs

import onnxgen
from onnxgen.demo import LayerConfig, build_layer, run


def test_domain_name_and_registration():
    assert onnxgen.DOMAIN == "onnxgen.preview"
    for name in ("PagedAttention", "MoE", "GroupedMatMul"):
        schema = defs.get_schema(name, 1, onnxgen.DOMAIN)
        assert schema.since_version == 1 and schema.has_type_and_shape_inference_function
    # The official FlexAttention is onnx's own, never re-registered by us.
    assert defs.get_schema("FlexAttention", 1, "ai.onnx.preview").domain == "ai.onnx.preview"
    assert not defs.has("FlexAttention", onnxgen.DOMAIN)


def test_registration_is_idempotent():
    from onnxgen.ops import register

    register()
    register()
    code = "import onnxgen, importlib, onnxgen.ops as o; o.register(); importlib.reload(onnxgen); print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "ok"


def test_checker_and_strict_inference_accept_a_model_using_the_ops():
    model = build_layer(LayerConfig())
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    assert [d.dim_param or d.dim_value for d in types["attn"].shape.dim] == ["num_tokens", 64]
    assert [d.dim_param or d.dim_value for d in types["moe_out"].shape.dim] == ["num_tokens", 64]


def test_demo_reference_and_onnxruntime_agree():
    lines = []
    assert run(out=lines.append) < 1e-3
    assert "agrees with the reference" in lines[-1] and "kernels" in lines[-1]
