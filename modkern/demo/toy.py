"""Tiny models and a character-level tokenizer, built locally (no downloads), for the demo
and the tests: real transformers classes with random, seeded weights."""

from __future__ import annotations

import torch

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


def char_tokenizer(alphabet: str):
    """A `PreTrainedTokenizerFast` with one token per character of `alphabet`, after the
    special tokens <pad> (id 0), <eos> (1) and <unk> (2). Decoding concatenates characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(alphabet):  # first occurrence order, no duplicates
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                   eos_token="<eos>", unk_token="<unk>")


# The sizes tiny_causal_lm takes by keyword, and their defaults (intermediate None: 2 x hidden).
TINY_SIZES = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": None,
              "max_positions": 128}
EOS_ID, PAD_ID = 1, 0  # the ids char_tokenizer gives <eos> and <pad>


def tiny_causal_lm(vocab_size: int, *, arch: str = "qwen2", seed: int = 0, **sizes: int):
    """A randomly initialised (seeded) Qwen2 or Llama causal LM of the given size, float32,
    in eval mode. `sizes`: any of TINY_SIZES (hidden, layers, heads, kv_heads,
    intermediate, max_positions)."""
    unknown = sorted(set(sizes) - set(TINY_SIZES))
    if unknown:
        raise TypeError(f"tiny_causal_lm: unknown sizes {unknown}; expected some of "
                        f"{sorted(TINY_SIZES)}")
    size = {**TINY_SIZES, **sizes}
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if arch not in classes:
        raise ValueError(f"tiny_causal_lm: arch must be one of {sorted(classes)}, got {arch!r}")
    config_cls, model_cls = classes[arch]
    config = config_cls(vocab_size=vocab_size, hidden_size=size["hidden"],
                        num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                        num_key_value_heads=size["kv_heads"],
                        intermediate_size=size["intermediate"] or 2 * size["hidden"],
                        max_position_embeddings=size["max_positions"],
                        tie_word_embeddings=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                        bos_token_id=EOS_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.float().eval()
