"""Tiny real Hugging Face checkpoints for the checkpoint-merge tests, built once per session
with transformers from small configs (random weights, N(0, 0.02) init), plus helpers.

    qwen_a   Qwen2, tied embeddings (no lm_head in the file), one model.safetensors, tokenizer
    qwen_b   Qwen2, tied, other seed, sharded (several shards + index)
    llama_a  Llama, untied (lm_head present), sharded, tokenizer
    llama_b  Llama, untied, other seed, one model.safetensors
    qwen_untied  Qwen2, untied: same shapes as qwen_a but an extra lm_head key
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_BUILT: dict[str, Path] = {}


def _qwen_config(tied: bool):
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, tie_word_embeddings=tied)


def _llama_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, tie_word_embeddings=False)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(100)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def _save(model_cls, config, seed: int, path: Path, shard: str | None, tokenizer: bool):
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.bfloat16)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    if tokenizer:
        _tokenizer().save_pretrained(path)


def checkpoints(root: Path) -> dict[str, Path]:
    """Build the checkpoints once (under root) and return name -> folder."""
    if _BUILT:
        return _BUILT
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM
    specs = {
        "qwen_a": (Qwen2ForCausalLM, _qwen_config(True), 0, None, True),
        "qwen_b": (Qwen2ForCausalLM, _qwen_config(True), 1, "20KB", False),
        "llama_a": (LlamaForCausalLM, _llama_config(), 2, "30KB", True),
        "llama_b": (LlamaForCausalLM, _llama_config(), 3, None, False),
        "qwen_untied": (Qwen2ForCausalLM, _qwen_config(False), 4, None, False),
    }
    for name, (cls, cfg, seed, shard, tok) in specs.items():
        _save(cls, cfg, seed, root / name, shard, tok)
        _BUILT[name] = root / name
    return _BUILT


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    return checkpoints(tmp_path_factory.mktemp("checkpoints"))


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, loaded with the safetensors library."""
    from safetensors.torch import load_file
    sd: dict[str, torch.Tensor] = {}
    files = sorted(glob.glob(str(folder / "*.safetensors")))
    assert files, f"no safetensors in {folder}"
    for f in files:
        sd.update(load_file(f))
    return sd


def padded(src: Path, dst: Path, rows: int, seed: int = 9) -> Path:
    """A copy of the checkpoint `src` with embed_tokens and lm_head padded to `rows` rows
    (random N(0, 0.02) rows, as padding is initialized) and config.json's vocab_size too."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for f in dst.glob("*.safetensors"):
        sd = load_file(str(f))
        for k in [k for k in sd if k in ("model.embed_tokens.weight", "lm_head.weight")]:
            t = sd[k]
            extra = torch.randn((rows - t.shape[0], *t.shape[1:]), generator=g) * 0.02
            sd[k] = torch.cat([t, extra.to(t.dtype)])
        save_file(sd, str(f), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | {"vocab_size": rows}))
    return dst


def run_cli(*args: str, env: dict | None = None, **kw):
    """Run `python -m modkern ...` as a user would; returns the CompletedProcess."""
    import subprocess
    full_env = dict(os.environ)
    full_env.pop("MODKERN_TEST_WRITE_DELAY", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "modkern", *map(str, args)], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=300, **kw)
