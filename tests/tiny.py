"""Tiny random causal LMs saved as real Hugging Face directories (no hub needed).

Widths are deliberately not multiples of 128 or 512, so every test exercises ragged blocks.
The tokenizer is a byte-level BPE trained in code on a few sentences, with a chat template,
so vLLM's /v1/chat/completions works too.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GenerationConfig, LlamaConfig,
                          PreTrainedTokenizerFast, Qwen3Config)

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Quantization stores weights with fewer bits; mixed precision gives more bits to salient "
    "blocks.",
    "Once upon a time there was a small model that learned to count: one, two, three, four.",
    "def add(a, b):\n    return a + b\n",
    "A fine-grained, search-free allocation ranks blocks by Fisher information.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")

VOCAB = 384


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch: str = "llama", hidden: int = 96, intermediate: int = 200,
                layers: int = 2, heads: int = 4, kv_heads: int = 2, tie: bool = True,
                **extra):
    """A transformers config of model_type `arch` with tiny widths (any model_type)."""
    from transformers import AutoConfig

    common = dict(**extra, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                  torch_dtype="float32")
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(**{"head_dim": hidden // heads, **common})
    return AutoConfig.for_model(arch, **common)


# A tiny random model of every model_type in sfmp_serve.arch (tests/test_families.py fails for a
# family without one). Head sizes are ones vLLM's CPU attention takes (32, 64, ..., 256).
FAMILY_MODELS: dict[str, dict] = {
    "llama": dict(heads=3, kv_heads=1),  # head_dim 32, GQA
    "mistral": dict(heads=3, kv_heads=1),
    "qwen2": dict(heads=3, kv_heads=1),  # biases on q, k, v
    "qwen3": dict(heads=3, kv_heads=1),  # q/k norms
    # one KV head of 256, a sliding-window layer (window 8) and a full one, softcaps (Gemma 2)
    "gemma2": dict(heads=2, kv_heads=1, head_dim=256, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(heads=2, kv_heads=1, head_dim=256, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(hidden=128, heads=2, kv_heads=2),  # fused qkv_proj / gate_up_proj, head_dim 64
    # 4 experts of 72 (ragged in groups of 32), top-2: every layer sparse
    "mixtral": dict(heads=3, kv_heads=1, intermediate=72, num_local_experts=4,
                    num_experts_per_tok=2),
    # layer 0 dense (mlp_only_layers), layer 1 sparse: 4 experts of 72, top-2, renormalised
    "qwen3_moe": dict(heads=3, kv_heads=1, head_dim=32, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=72, mlp_only_layers=[0], norm_topk_prob=True),
}


def make_family_model(out_dir: str | Path, model_type: str, **overrides) -> Path:
    """The tiny random model of FAMILY_MODELS[model_type], saved with its tokenizer."""
    return make_tiny_model(out_dir, model_type, **{**FAMILY_MODELS[model_type], **overrides})


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0,
                    dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Build, randomly initialise and save a tiny causal LM with its tokenizer."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-default init so quantization error and logits are not negligible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith(".bias"):  # transformers initialises biases to zero
                p.normal_(0, 0.05)
    model = model.to(dtype)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer().save_pretrained(out)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2).save_pretrained(out)
    return out


def starve_expert(model_dir: str | Path, expert: int, channel: int = 0) -> Path:
    """Rewrite a tiny MoE model (stacked experts, as transformers builds it) so that no token
    is ever routed to `expert` in any sparse layer: the residual stream's `channel` is a
    positive constant (every embedding row has 1.0 there, and no attention or MLP output
    writes to it), and the router row of `expert` reads only that channel, with weight -50,
    so its logit is far below every other expert's."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channel] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[channel] = 0
            block = getattr(layer, "mlp")
            if hasattr(block, "experts"):
                block.experts.down_proj[:, channel] = 0  # [E, hidden, intermediate]
                block.gate.weight[expert] = 0
                block.gate.weight[expert, channel] = -50.0
            else:
                block.down_proj.weight[channel] = 0
    model.save_pretrained(model_dir, safe_serialization=True)
    return Path(model_dir)
