"""Tiny random models of every supported family, built offline in milliseconds.

Used by the test-suite and handy for trying NeuronAtlas without weights:

    >>> from neuronatlas.models.tiny import tiny_model
    >>> lm = tiny_model("llama", seed=0)      # 2 layers, 32 neurons per layer, a real BPE tokenizer

The tokenizer is a byte-level BPE trained on a few sentences at build time (no download).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from neuronatlas.models.loading import LoadedModel, wrap_model

__all__ = ["tiny_model", "tiny_tokenizer", "TINY_FAMILIES"]

_CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Berlin is the capital of Germany. Madrid is in Spain. Rome is in Italy.",
    "My favourite animal is a dog. Today I saw a cat and a bird.",
    "Le chat est noir. Der Hund ist braun. El perro es grande.",
    "Iron has the symbol Fe. Gold has the symbol Au. 0 1 2 3 4 5 6 7 8 9 10",
]

TINY_FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt")


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def _config(family: str, vocab: int) -> Any:
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=vocab, pad_token_id=1, eos_token_id=0, bos_token_id=0)
    gated = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=128, **common)
    if family == "llama":
        return tf.LlamaConfig(**gated)
    if family == "mistral":
        return tf.MistralConfig(**gated)
    if family == "qwen2":
        return tf.Qwen2Config(**gated)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=8, **gated)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(head_dim=8, sliding_window=16, **gated)
    if family == "phi3":
        return tf.Phi3Config(**{**gated, "num_key_value_heads": 2})
    if family == "gpt2":
        return tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_inner=32, n_positions=128, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                max_position_embeddings=128, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=128, word_embed_proj_dim=16, **common)
    raise ValueError(f"no tiny config for {family!r}; choose from {', '.join(TINY_FAMILIES)}")


def tiny_model(family: str = "llama", seed: int = 0) -> LoadedModel:
    """A randomly initialised 2-layer model of ``family`` (float32, eval mode, CPU)."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = _config(family, len(tok))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        # Random init leaves biases and norm weights at 0/1; perturb them so tests see real numerics.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return wrap_model(model.float(), tok, name=f"tiny-{family}", provenance={"seed": seed})
