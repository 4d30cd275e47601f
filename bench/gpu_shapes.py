"""Model-shaped random state dicts for the GPU suites: Qwen2.5 tensor names and shapes, every
tensor N(0, 0.02), built directly on the device (a 7B pair takes milliseconds there).

    QWEN25_7B   hidden 3584, MLP 18944, 28 layers, 4 KV heads, vocab 152064, untied:
                7.62 B parameters, 15.2 GB in bf16 (339 tensors, 141 of them 1-D)
    QWEN25_1P5B_16L  Qwen2.5-1.5B's shapes, 16 of its 28 layers: 0.98 B, 1.96 GB in bf16
                (the 2 GB checkpoint pair)
    TINY        the same names at toy sizes (the dry run)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QwenShape:
    """The dimensions that fix a Qwen2 model's tensor shapes."""

    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # key/value heads x head dim
    vocab: int
    tied: bool  # tied embeddings: no lm_head tensor


QWEN25_7B = QwenShape(3584, 18944, 28, 512, 152064, tied=False)
QWEN25_1P5B_16L = QwenShape(1536, 8960, 16, 256, 151936, tied=True)
TINY = QwenShape(64, 160, 2, 16, 256, tied=False)


def qwen_shapes(q: QwenShape) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in the order a Hugging Face Qwen2 checkpoint lists them."""
    h = q.hidden
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (q.vocab, h)}
    for i in range(q.layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                   p + "self_attn.k_proj.weight": (q.kv_dim, h),
                   p + "self_attn.k_proj.bias": (q.kv_dim,),
                   p + "self_attn.v_proj.weight": (q.kv_dim, h),
                   p + "self_attn.v_proj.bias": (q.kv_dim,),
                   p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (q.intermediate, h),
                   p + "mlp.up_proj.weight": (q.intermediate, h),
                   p + "mlp.down_proj.weight": (h, q.intermediate),
                   p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    shapes["model.norm.weight"] = (h,)
    if not q.tied:
        shapes["lm_head.weight"] = (q.vocab, h)
    return shapes


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int, device: str,
                      dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every tensor N(0, 0.02) in `dtype`, drawn on `device` (seeded)."""
    g = torch.Generator(device).manual_seed(seed)
    return {name: torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(0.02)
            for name, shape in shapes.items()}


def total_bytes(sd: dict[str, torch.Tensor]) -> int:
    """Bytes of all the tensors of a state dict."""
    return sum(t.numel() * t.element_size() for t in sd.values())
