"""Tiny Hugging Face decoder models with seeded random weights, built from configs (no hub):
one per exported family, saved as checkpoints for the exporter and used as oracles."""

from __future__ import annotations

import torch

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 7}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "llama-rope-llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "llama-rope-linear": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "sliding_window": 9}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 12, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 8.0,
        "sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {
        "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 5,
        "layer_types": ["sliding_attention", "full_attention"]}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 5,
                                                          "max_window_layers": 1}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {
        "embedding_multiplier": 3.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5, "logits_scaling": 2.5}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 12, "sliding_window": 6,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}}}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"no_rope_layers": [1, 0], "pad_token_id": 0, "bos_token_id": 1,
                                                      "eos_token_id": 2}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40, "mlp_only_layers": [1]}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "head_dim": 16,
        "norm_topk_prob": True}),
}


def tiny_checkpoint(family: str, folder, seed: int, **overrides):
    """A random-weight model of ``family`` saved in ``folder``; ``overrides`` change its config."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    settings = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    config = getattr(transformers, config_name)(**{**settings, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # random weights large enough that mistakes show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.normal_(0, 0.1)
            elif "gate" in name and "proj" not in name and p.ndim == 2:  # routers: decisive choices
                p.normal_(0, 0.6)
    model.save_pretrained(folder)
    return model


def assert_greedy_matches(hf_model, prompt: list[int], ours: list[int], tie: float = 1e-4) -> None:
    """``ours`` equals transformers' greedy ``generate`` of ``len(ours)`` tokens after ``prompt``,
    up to the first step where transformers' own top two scores tie within ``tie`` (random
    weights make such ties; past one, the continuations may rightly differ)."""
    ids = torch.tensor([prompt])
    hf_model.generation_config.eos_token_id = None  # plain argmax at every step
    with torch.no_grad():
        result = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(ours),
                                   do_sample=False, pad_token_id=0, output_scores=True,
                                   return_dict_in_generate=True)
    want = result.sequences[0, len(prompt):].tolist()
    for j, (a, b) in enumerate(zip(ours, want)):
        if a != b:
            scores = result.scores[j][0]
            assert float(scores[b] - scores[a]) < tie, f"token {j}: ours {a}, transformers {b} ({ours} vs {want})"
            return
    assert len(ours) == len(want)
