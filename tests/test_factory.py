"""The pipeline and device factories (pipeline_factory.hpp, device_factory.hpp, data_types.hpp).

The text-to-text pipeline made by the factory under ``onnxgen`` gives transformers' greedy tokens;
the frameworks whose packages import are registered, the others are not; an unregistered name gets
the header's error.  (The text-to-image pipeline through the factory is tested in test_text2image.py,
beside its model.)
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from onnxgen.pipelines.factory import (Device, DeviceFactory, Tensor, Text2ImagePipelineFactory,
                                       Text2TextPipelineFactory, UnregisteredFramework)


def test_frameworks_registered_when_their_packages_import():
    present = {"onnxruntime-genai": importlib.util.find_spec("onnxruntime_genai") is not None,
               "openvino-genai": importlib.util.find_spec("openvino_genai") is not None}
    for factory in (DeviceFactory, Text2TextPipelineFactory):
        names = factory.get_instance().names()
        assert "onnxgen" in names
        for name, installed in present.items():
            assert (name in names) == installed, (factory.__name__, name)
    images = Text2ImagePipelineFactory.get_instance().names()
    assert "onnxgen" in images and ("openvino-genai" in images) == present["openvino-genai"]
    assert "onnxruntime-genai" not in images  # it has no image pipeline
    assert DeviceFactory.get_instance().enumerate("onnxgen")[0].identifier == "CPU"


def test_unregistered_framework_error():
    for factory in (Text2TextPipelineFactory, Text2ImagePipelineFactory):
        with pytest.raises(UnregisteredFramework, match="Unregistered GenAI framework: tensorflow-genai"):
            factory.get_instance().create("tensorflow-genai", "somewhere", [Device("CPU")])
    with pytest.raises(UnregisteredFramework, match="Unregistered GenAI framework: nope"):
        DeviceFactory.get_instance().enumerate("nope")


def test_register_a_framework(tmp_path):
    calls = []

    def creator(models_path, devices):
        calls.append((models_path, [d.identifier for d in devices]))
        return "a pipeline"

    factory = Text2TextPipelineFactory.get_instance()
    factory.register("mine", creator)
    DeviceFactory.get_instance().register("mine", lambda: [Device("NPU", {"cores": 2}), Device("CPU")])
    try:
        assert factory.create("mine", tmp_path) == "a pipeline"  # no devices: the framework's first
        assert factory.create("mine", tmp_path, [Device("CPU")]) == "a pipeline"
        assert calls == [(tmp_path, ["NPU"]), (tmp_path, ["CPU"])]
        assert Text2TextPipelineFactory.get_instance() is factory
        assert "mine" not in Text2ImagePipelineFactory.get_instance().names()  # separate registries
    finally:
        factory.unregister("mine")
        DeviceFactory.get_instance().unregister("mine")


def test_tensor_wraps_numpy():
    t = Tensor(np.zeros((2, 3), np.float32), framework_id="openvino-genai")
    assert t.shape == (2, 3) and t.type_id == 1 and t.framework_id == "openvino-genai"
    assert np.asarray(t) is t.data and Tensor([1, 2]).type_id == 7 and Tensor(np.zeros(1, np.uint8)).type_id == 2


def test_text2text_through_the_factory_matches_transformers(tmp_path, rng):
    pytest.importorskip("torch")
    from hf_models import assert_greedy_matches, tiny_checkpoint
    from onnxgen.export.llm import build

    hf = tiny_checkpoint("llama", tmp_path / "hf", 5)
    build(tmp_path / "hf", tmp_path / "onnx", block_size=4)
    pipe = Text2TextPipelineFactory.get_instance().create("onnxgen", tmp_path / "onnx",
                                                        DeviceFactory.get_instance().enumerate("onnxgen"))
    prompt = list(map(int, rng.integers(3, 97, 7)))
    result = pipe(prompt, max_new_tokens=8, ignore_eos=True)
    assert len(result.token_ids[0]) == 8
    assert_greedy_matches(hf, prompt, result.token_ids[0])


def test_onnxruntime_genai_and_onnxgen_give_the_same_greedy_tokens(tmp_path, rng):
    """The same random Llama through onnxruntime-genai (its model builder's export) and onnxgen."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("torch")
    import json
    import shutil
    import subprocess
    import sys

    from hf_models import assert_greedy_matches, tiny_checkpoint
    from onnxgen.default_model import mistral_tokenizer_model
    from onnxgen.export.llm import build

    hf = tiny_checkpoint("llama", tmp_path / "hf", 11, hidden_size=64)  # its GQA kernel wants head size % 8 == 0
    shutil.copy(mistral_tokenizer_model(), tmp_path / "hf" / "tokenizer.model")  # the builder saves a tokenizer
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tmp_path / "hf"), "-o",
                    str(tmp_path / "og"), "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache")],
                   check=True, capture_output=True)
    build(tmp_path / "hf", tmp_path / "onnx", block_size=4)
    factory = Text2TextPipelineFactory.get_instance()
    prompt = list(map(int, rng.integers(3, 97, 6)))
    theirs = factory.create("onnxruntime-genai", tmp_path / "og", [Device("cpu")])(prompt, max_new_tokens=8)
    ours = factory.create("onnxgen", tmp_path / "onnx")(prompt, max_new_tokens=8, ignore_eos=True)
    assert len(ours.token_ids[0]) == len(theirs.token_ids[0]) == 8
    for tokens in (ours.token_ids[0], theirs.token_ids[0]):  # both equal transformers' (up to a tie in its scores)
        assert_greedy_matches(hf, prompt, tokens)


def test_openvino_genai_and_onnxgen_give_the_same_greedy_tokens(tmp_path, rng):
    """The same random Llama through openvino-genai (the IR optimum-intel converts) and onnxgen.

    optimum-intel needs an older transformers than this project's, so it lives in a separate venv
    (``ONNXGEN_PEERS_VENV``, default /work/peers-venv; benchmarks/serving_peers.py says how to make
    it); where that venv is absent this test cannot convert the model and is skipped."""
    pytest.importorskip("openvino_genai")
    pytest.importorskip("torch")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import serving_peers

    if not (serving_peers.PEERS_VENV / "bin" / "optimum-cli").exists():
        pytest.skip(f"no optimum-cli in {serving_peers.PEERS_VENV}: openvino-genai needs a model optimum-intel converts")
    from hf_models import assert_greedy_matches, tiny_checkpoint
    from onnxgen.export.llm import build

    hf = tiny_checkpoint("llama", tmp_path / "hf", 13, hidden_size=64)
    build(tmp_path / "hf", tmp_path / "onnx", block_size=4)
    factory = Text2TextPipelineFactory.get_instance()
    prompt = list(map(int, rng.integers(3, 97, 6)))
    theirs = factory.create("openvino-genai", serving_peers.openvino_ir(tmp_path / "hf"),
                            DeviceFactory.get_instance().enumerate("openvino-genai")[:1])(prompt, max_new_tokens=8)
    ours = factory.create("onnxgen", tmp_path / "onnx")(prompt, max_new_tokens=8, ignore_eos=True)
    assert len(ours.token_ids[0]) == len(theirs.token_ids[0]) == 8
    for tokens in (ours.token_ids[0], theirs.token_ids[0]):  # both equal transformers' (up to a tie in its scores)
        assert_greedy_matches(hf, prompt, tokens)
