"""Text2TextPipeline and Generator against transformers: greedy and beam search (the paged cache
shared between beams, copied on write) give ``generate``'s tokens and scores."""

from __future__ import annotations

import pytest
import torch

from hf_models import assert_greedy_matches, tiny_checkpoint
from onnxgen.export.llm import build
from onnxgen.pipelines import GenerationConfig, Text2TextPipeline

BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf = tiny_checkpoint("llama", folder / "hf", 99)
    build(folder / "hf", folder / "onnx", block_size=BLOCK)
    return hf, folder / "onnx"


def test_greedy_batch_matches_transformers(model, rng):
    hf, folder = model
    pipe = Text2TextPipeline(folder, max_num_batched_tokens=6)
    prompts = [list(map(int, rng.integers(3, 97, n))) for n in (3, 10, 6)]
    result = pipe(prompts, max_new_tokens=10, ignore_eos=True)
    for prompt, tokens in zip(prompts, result.token_ids):
        assert len(tokens) == 10
        assert_greedy_matches(hf, prompt, tokens)


@pytest.mark.parametrize("num_beams, length_penalty", [(2, 1.0), (4, 1.0), (3, 0.5)])
def test_beam_search_matches_transformers(model, rng, num_beams, length_penalty):
    """No eos: every beam runs max_new_tokens, so the oracle is exact: transformers' returned
    sequences in order, and their scores (sum of log-probabilities ÷ length ** penalty, 1e-4)."""
    hf, folder = model
    pipe = Text2TextPipeline(folder, num_blocks=40)
    prompt = list(map(int, rng.integers(3, 97, 6)))  # not a multiple of the block: beams share a partial block
    new = 9
    result = pipe(prompt, max_new_tokens=new, ignore_eos=True, num_beams=num_beams,
                  num_return_sequences=num_beams, length_penalty=length_penalty)
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, num_beams=num_beams,
                           num_return_sequences=num_beams, do_sample=False, length_penalty=length_penalty,
                           early_stopping=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    want_tokens = want.sequences[:, len(prompt):].tolist()
    assert result.token_ids == want_tokens
    torch.testing.assert_close(torch.tensor(result.scores, dtype=torch.float32), want.sequences_scores,
                               atol=1e-4, rtol=1e-4)
    assert pipe.engine.pool.num_free == 40, "beam search left blocks held"


def test_beam_search_with_eos_ends_hypotheses(model, rng):
    hf, folder = model
    pipe = Text2TextPipeline(folder)
    prompt = list(map(int, rng.integers(3, 97, 5)))
    greedy = pipe(prompt, max_new_tokens=6, ignore_eos=True).token_ids[0]
    eos = greedy[1]
    result = pipe(prompt, max_new_tokens=6, num_beams=3, num_return_sequences=3, eos_token_ids=[eos])
    assert result.scores == sorted(result.scores, reverse=True)
    for tokens in result.token_ids:
        assert eos not in tokens[:-1] and (tokens[-1] == eos or len(tokens) == 6)


def test_generator_token_by_token_and_appended_input(model, rng):
    hf, folder = model
    pipe = Text2TextPipeline(folder)
    prompt = list(map(int, rng.integers(3, 97, 7)))
    generator = pipe.generator(GenerationConfig(max_new_tokens=5, ignore_eos=True))
    generator.append_input_tokens(prompt)
    tokens = []
    while not generator.is_done():
        tokens.append(generator.generate_next_token())
        if len(tokens) == 2:  # a second turn of input, mid-generation
            turn = list(map(int, rng.integers(3, 97, 3)))
            generator.append_input_tokens(turn)
            tokens_before_turn = list(tokens)
    assert len(tokens) == 5
    assert_greedy_matches(hf, prompt, tokens_before_turn)
    assert_greedy_matches(hf, prompt + tokens_before_turn + turn, tokens[2:])
    with pytest.raises(RuntimeError, match="done"):
        generator.generate_next_token()
    assert pipe.engine.pool.num_free == len(pipe.engine.pool.blocks)


def test_default_model_text_and_chat(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path))
    pipe = Text2TextPipeline(kv_cache_gib=0.05)
    text = pipe("Once upon a time", max_new_tokens=6, ignore_eos=True)
    assert isinstance(str(text), str) and len(text.token_ids[0]) == 6
    chat = pipe([{"role": "user", "content": "Hi"}], max_new_tokens=4, ignore_eos=True)
    want = pipe(pipe.tokenizer.encode("[INST] Hi [/INST]"), max_new_tokens=4, ignore_eos=True)
    assert chat.token_ids == want.token_ids
    seen = []
    streamed = pipe("Hello", max_new_tokens=8, ignore_eos=True, streamer=seen.append)
    assert "".join(seen) == streamed.texts[0]


@pytest.mark.parametrize("options, message", [
    (dict(num_beams=0), "num_beams must be"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences must be in"),
    (dict(num_beams=2, do_sample=True), "beam search with do_sample"),
    (dict(max_new_tokens=2, min_new_tokens=3), "min_new_tokens must be in"),
    (dict(top_p=0.0, do_sample=True), "top_p must be in"),
    (dict(max_length=3), "max_length=3 leaves no room"),
])
def test_impossible_generation_configs(model, options, message):
    _, folder = model
    pipe = Text2TextPipeline(folder, num_blocks=16)
    with pytest.raises(ValueError, match=message):
        pipe([3, 4, 5, 6], **options)
    with pytest.raises(TypeError, match="unknown generation option 'beams'"):
        pipe([3, 4], beams=2)
    with pytest.raises(ValueError, match="device 'GPU' is not available"):
        Text2TextPipeline(folder, device="GPU")
