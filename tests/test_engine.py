"""The serving engine against transformers: greedy tokens of every request equal ``generate``'s
for that request alone, whatever the batch composition, arrival order, chunking, preemption or
prefix-cache hits; and the block accounting never leaks (a property test over random workloads)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_models import assert_greedy_matches, tiny_checkpoint
from onnxgen.engine import LLMEngine, SamplingParams, Status
from onnxgen.export.llm import build

BLOCK = 4
VOCAB = 97


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = tiny_checkpoint(request.param, folder / "hf", 1234)
    build(folder / "hf", folder / "onnx", block_size=BLOCK)
    return hf, folder / "onnx"


def run_with_arrivals(engine: LLMEngine, prompts, params, arrivals) -> dict[int, list[int]]:
    """Add prompt i when the engine has taken ``arrivals[i]`` steps; every output token, by prompt."""
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    ids: dict[str, int] = {}
    step = 0
    while len(ids) < len(prompts) or engine.has_unfinished_requests():
        for i, at in enumerate(arrivals):
            if at == step:
                ids[engine.add_request(prompts[i], params)] = i
        for output in engine.step():
            tokens[ids[output.request_id]].extend(output.new_token_ids)
        step += 1
    return tokens


ENGINES = {
    "one-step prefill": dict(max_num_batched_tokens=512),
    "chunked prefill": dict(max_num_batched_tokens=5),
    "preemption": dict(num_blocks=9, max_num_batched_tokens=16),
    "max_num_seqs 2": dict(max_num_seqs=2),
}


@pytest.mark.parametrize("setting", sorted(ENGINES))
def test_greedy_matches_transformers(model, rng, setting):
    hf, folder = model
    engine = LLMEngine(folder, **ENGINES[setting])
    shared = list(map(int, rng.integers(3, VOCAB, 9)))  # some prompts share a prefix: cache hits
    prompts = [list(map(int, rng.integers(3, VOCAB, n))) for n in (5, 13, 2, 7)] + [shared + [5], shared + [6, 7]]
    arrivals = list(rng.integers(0, 6, len(prompts)))
    tokens = run_with_arrivals(engine, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True), arrivals)
    for i, prompt in enumerate(prompts):
        assert len(tokens[i]) == 12, f"prompt {i} got {len(tokens[i])} tokens"
        assert_greedy_matches(hf, prompt, tokens[i])
    if setting == "preemption":
        assert engine.scheduler.num_preemptions > 0, "the tiny block budget should have forced preemption"
    assert engine.pool.num_free == len(engine.pool.blocks)


def test_prefix_cache_computes_a_shared_prompt_once(model, rng):
    hf, folder = model
    engine = LLMEngine(folder)
    system = list(map(int, rng.integers(3, VOCAB, 4 * BLOCK + 1)))
    first = engine.generate([system + [10, 11]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    computed = engine.stats.prompt_tokens
    second = engine.generate([system + [12]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert first.cached_prompt_tokens == 0 and second.cached_prompt_tokens == 4 * BLOCK
    assert engine.stats.prompt_tokens - computed == len(system) + 1 - 4 * BLOCK - 1  # only the tail computed
    assert_greedy_matches(hf, system + [12], second.token_ids)


def test_seeded_sampling_does_not_depend_on_the_batch(model, rng):
    _, folder = model
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=7, ignore_eos=True)
    prompt = list(map(int, rng.integers(3, VOCAB, 6)))
    alone = LLMEngine(folder).generate([prompt], params)[0].token_ids
    others = [list(map(int, rng.integers(3, VOCAB, n))) for n in (3, 8, 11)]
    crowd = LLMEngine(folder, max_num_batched_tokens=7)
    mixed = crowd.generate(others[:2] + [prompt] + others[2:],
                           [SamplingParams(max_new_tokens=9, temperature=1.0, seed=i) for i in range(2)]
                           + [params] + [SamplingParams(max_new_tokens=5, temperature=1.0)])
    assert mixed[2].token_ids == alone
    assert LLMEngine(folder).generate([prompt], SamplingParams(**{**params.__dict__, "seed": 8}))[0].token_ids != alone


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_block_is_free_after_any_workload(model, data):
    """Random prompts, lengths, arrivals, aborts and a small cache: every request ends exactly
    once with the right number of tokens (unless aborted), and every block is free at the end."""
    _, folder = model
    num_blocks = data.draw(st.integers(8, 24), label="num_blocks")
    engine = LLMEngine(folder, num_blocks=num_blocks, max_num_batched_tokens=data.draw(st.integers(1, 24)),
                       max_num_seqs=data.draw(st.integers(1, 6)))
    n = data.draw(st.integers(1, 8), label="requests")
    prompts = [data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=12)) for _ in range(n)]
    lengths = [data.draw(st.integers(1, 10)) for _ in range(n)]
    abort_at = {i: data.draw(st.integers(0, 12)) for i in range(n) if data.draw(st.booleans())}
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=m, ignore_eos=True)) for p, m in zip(prompts, lengths)]
    finished: dict[str, object] = {}
    step = 0
    while engine.has_unfinished_requests():
        for i, at in abort_at.items():
            if at == step:
                engine.abort_request(ids[i])
        for output in engine.step():
            assert output.request_id not in finished, "a request finished twice"
            if output.finished:
                finished[output.request_id] = output
        step += 1
        assert step < 500, "the engine stopped making progress"
    assert set(finished) == set(ids)
    for i, request_id in enumerate(ids):
        output = finished[request_id]
        if output.finish_reason != "abort":
            assert len(output.token_ids) == lengths[i] and output.finish_reason == "length"
    assert engine.pool.num_free == num_blocks
    assert all(b.ref_count == 0 for b in engine.pool.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_abort_mid_generation_frees_blocks(model):
    _, folder = model
    engine = LLMEngine(folder, num_blocks=16)
    keep = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=6, ignore_eos=True))
    drop = engine.add_request([8, 9, 10, 11, 12], SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.step()
    engine.step()
    held = engine.pool.num_free
    engine.abort_request(drop)
    assert engine.pool.num_free > held
    outputs = [o for _ in range(10) for o in engine.step()]
    aborted = [o for o in outputs if o.request_id == drop]
    assert len(aborted) == 1 and aborted[0].finish_reason == "abort" and aborted[0].finished
    assert [o.finish_reason for o in outputs if o.request_id == keep and o.finished] == ["length"]
    assert engine.pool.num_free == 16


def test_eos_min_new_tokens_and_stop_on_token_ids(model, rng):
    hf, folder = model
    engine = LLMEngine(folder)
    prompt = list(map(int, rng.integers(3, VOCAB, 5)))
    free = engine.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    eos = free[2]
    first = free.index(eos)
    stopped = engine.generate([prompt], SamplingParams(max_new_tokens=8, eos_token_ids=[eos]))[0]
    assert stopped.token_ids == free[:first + 1] and stopped.finish_reason == "stop"
    held = engine.generate([prompt], SamplingParams(max_new_tokens=8, min_new_tokens=first + 2,
                                                    eos_token_ids=[eos]))[0]
    assert len(held.token_ids) >= first + 2 and eos not in held.token_ids[:first + 2]


@pytest.mark.parametrize("params, message", [
    (dict(top_p=0.0), "top_p must be in"),
    (dict(max_new_tokens=3, min_new_tokens=5), "min_new_tokens must be in"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be"),
])
def test_impossible_sampling_params_are_refused(model, params, message):
    _, folder = model
    engine = LLMEngine(folder, num_blocks=8)
    with pytest.raises(ValueError, match=message):
        engine.add_request([3, 4], SamplingParams(**params))
    assert not engine.has_unfinished_requests()


def test_bad_prompts_are_refused(model):
    _, folder = model
    engine = LLMEngine(folder, num_blocks=8)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="context is 128"):
        engine.add_request([3] * 128)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        engine.add_request([3, 97])
    with pytest.raises(ValueError, match="needs 11 KV blocks; the cache has 8"):
        engine.add_request([3] * 30, SamplingParams(max_new_tokens=12))
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("text")
    engine.add_request([3], SamplingParams(max_new_tokens=4), request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([4], SamplingParams(max_new_tokens=4), request_id="a")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an onnxgen model folder"):
        LLMEngine(tmp_path)


def test_kv_usage_waste_is_below_a_block_per_sequence(model, rng):
    _, folder = model
    engine = LLMEngine(folder)
    for n in rng.integers(5, 40, 6):
        engine.add_request(list(map(int, rng.integers(3, VOCAB, n))), SamplingParams(max_new_tokens=20, ignore_eos=True))
    for _ in range(5):
        engine.step()
        stored, slots = engine.kv_usage()
        assert slots - stored < BLOCK * len(engine.scheduler.running) + 1
    assert all(s.status is Status.RUNNING for s in engine.scheduler.running)
