"""Text in and out: our tokenizer against transformers' on Mistral's SentencePiece model, the
sampler's filters against transformers' logits processors, streaming and stop strings, and the
embedded default model against transformers' MixtralForCausalLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_models import assert_greedy_matches
from onnxgen.engine import LLMEngine, SamplingParams
from onnxgen.engine.sampler import penalize_repetition, probabilities
from onnxgen.tokenizer import Detokenizer, Tokenizer

TEXTS = ["Hello world", "  leading spaces and\nnew lines\n", "héllo 日本語 🙂 café", "<s>[INST] hi [/INST]",
         "numbers 12345 and symbols #@!", ""]


@pytest.fixture(scope="session")
def default_folder(tmp_path_factory):
    import os

    from onnxgen import default_model

    cache = tmp_path_factory.mktemp("cache")
    os.environ["ONNXGEN_CACHE"] = str(cache)
    return default_model.default_model(progress=False)


@pytest.fixture(scope="session")
def hf_tokenizer(default_folder):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(default_folder))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_mistral_and_transformers(default_folder, hf_tokenizer, text):
    """Mistral's own tokenizer (mistral-common) is the oracle for plain text; transformers' agrees
    except on runs of spaces, where its converted tokenizer splits "▁▁▁x" as "▁▁"+"x" where
    SentencePiece gives "▁▁"+"▁x" (a known difference of the conversion; both decode alike)."""
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    ours = Tokenizer(default_folder)
    mistral = SentencePieceTokenizer(str(default_folder / "tokenizer.model"))
    if "<s>" not in text:  # mistral-common encodes control tokens' text as plain text
        assert ours.encode(text) == mistral.encode(text, bos=True, eos=False)
        assert ours.encode(text, add_special_tokens=False) == mistral.encode(text, bos=False, eos=False)
    if "  " not in text:
        assert ours.encode(text) == hf_tokenizer.encode(text)
    ids = ours.encode(text)
    assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True) == mistral.decode(ids)


def test_chat_template_matches_transformers(default_folder, hf_tokenizer):
    ours = Tokenizer(default_folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == want
    assert ours.encode_chat(messages) == hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    with pytest.raises(ValueError, match="roles are system, user and assistant; got tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_streamed_text_equals_the_decoded_whole(default_folder, rng):
    tokenizer = Tokenizer(default_folder)
    prompt = tokenizer.encode("Streaming: ")
    ids = list(map(int, rng.integers(3, tokenizer.vocab_size, 60))) + tokenizer.encode("é日🙂 end", False)
    detok = Detokenizer(tokenizer, prompt)
    streamed = "".join(detok.add([t]) for t in ids)
    whole = tokenizer.decode(prompt + ids)
    assert whole.endswith(streamed) and streamed.endswith("é日🙂 end")
    assert tokenizer.decode(prompt) + streamed == whole


def test_sampler_filters_match_transformers(rng):
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    logits = rng.normal(0, 3, 500).astype(np.float32)
    seen = list(map(int, rng.integers(0, 500, 30)))
    for temperature, top_k, top_p, min_p in [(0.7, 0, 1.0, 0.0), (1.3, 20, 1.0, 0.0), (1.0, 0, 0.8, 0.0),
                                              (0.9, 50, 0.9, 0.0), (1.0, 0, 1.0, 0.1)]:
        scores = torch.tensor(logits)[None]
        scores = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), scores)
        scores = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        if min_p:
            scores = MinPLogitsWarper(min_p)(None, scores)
        want = torch.softmax(scores.double(), -1)[0].numpy()
        ours = probabilities(penalize_repetition(logits, seen, 1.3), temperature, top_k, top_p, min_p)
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-9)


def test_default_model_is_a_real_mixtral(default_folder, tmp_path):
    """The default's checkpoint loads in transformers' MixtralForCausalLM, and the engine's greedy
    tokens on the exported model equal its ``generate``."""
    from transformers import MixtralForCausalLM

    from onnxgen import default_model

    checkpoint = default_model.write_checkpoint(tmp_path / "ckpt")
    hf = MixtralForCausalLM.from_pretrained(str(checkpoint)).eval()
    engine = LLMEngine(default_folder, kv_cache_gib=0.05)
    prompts = ["Once upon a time", "The capital of France is"]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        assert_greedy_matches(hf, engine.tokenizer.encode(prompt), output.token_ids)
        assert output.text == engine.tokenizer.decode(output.token_ids)


def test_stop_strings_end_the_text_before_them(default_folder):
    engine = LLMEngine(default_folder, kv_cache_gib=0.05)
    free = engine.generate(["Once upon a time"], SamplingParams(max_new_tokens=24, ignore_eos=True))[0]
    stop = free.text[8:11]
    assert stop.strip(), f"pick a visible stop string from {free.text!r}"
    request = engine.add_request("Once upon a time", SamplingParams(max_new_tokens=24, ignore_eos=True, stop=[stop]))
    streamed, final = "", None
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id == request
            streamed += output.new_text
            final = output
    cut = free.text.index(stop)
    assert final.finish_reason == "stop" and final.text == free.text[:cut] and streamed == final.text


def test_cli_generate(default_folder, capsys):
    from onnxgen.cli import main

    assert main(["generate", "Hello", "--max-new-tokens", "5", "--kv-cache-gib", "0.05"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "5 tokens in" in err
    assert main(["generate", "Hi", "--top-p", "0", "--kv-cache-gib", "0.05"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_cli_bench_serve(default_folder, capsys):
    from onnxgen.cli import main

    assert main(["bench", "serve", "--requests", "3", "--prompt-lens", "4", "20", "--output-lens", "2", "5",
                 "--kv-cache-gib", "0.05", "--shared-prefix", "16"]) == 0
    out = capsys.readouterr().out
    assert "output tokens/s" in out and "KV utilisation" in out and "requests / prompt tokens" in out
