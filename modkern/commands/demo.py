"""`modkern demo`: merge two state dicts shaped like a small Qwen2 model, check the result
against the reference formula and print what was taken and how long each backend took."""

from __future__ import annotations

import argparse
import time

import torch

from ..backends import interpreter_enabled, triton_available
from ..merge import MergeStats, merge_state_dicts
from ..select_reference import mod_select_reference


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="merge two built-in example models and report",
                       description=__doc__)
    p.add_argument("--alpha", type=float, default=0.9,
                   help="MoD threshold in [0, 1] (default 0.9, the paper's)")
    p.add_argument("--hidden", type=int, default=256,
                   help="hidden size of the example model (default 256)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(command="demo")


def qwen2_like_state_dict(hidden: int, layers: int, vocab: int = 1024,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights with a Qwen2 model's names and shape ratios."""
    g = torch.Generator().manual_seed(seed)
    inter = hidden * 11 // 4 // 64 * 64 or 64
    kv = max(hidden // 6 // 32 * 32, 32)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.q_proj.bias": w(hidden),
               p + "self_attn.k_proj.weight": w(kv, hidden), p + "self_attn.k_proj.bias": w(kv),
               p + "self_attn.v_proj.weight": w(kv, hidden), p + "self_attn.v_proj.bias": w(kv),
               p + "self_attn.o_proj.weight": w(hidden, hidden),
               p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
               p + "mlp.down_proj.weight": w(hidden, inter),
               p + "input_layernorm.weight": 1 + w(hidden), p + "post_attention_layernorm.weight": 1 + w(hidden)}
    sd["model.norm.weight"] = 1 + w(hidden)
    sd["lm_head.weight"] = w(vocab, hidden)
    return sd


def run(args: argparse.Namespace) -> int:
    sd1 = qwen2_like_state_dict(args.hidden, args.layers, seed=args.seed)
    sd2 = qwen2_like_state_dict(args.hidden, args.layers, seed=args.seed + 1)
    backends = ["torch"]
    if torch.cuda.is_available() and triton_available():
        backends.append("triton")
        sd1 = {k: v.cuda() for k, v in sd1.items()}
        sd2 = {k: v.cuda() for k, v in sd2.items()}
    elif triton_available() and interpreter_enabled():
        backends.append("triton")
    numel = sum(t.numel() for t in sd1.values())
    print(f"modkern demo: {len(sd1)} tensors, {numel:,} bf16 elements, alpha={args.alpha}")
    print(f"{'backend':<10}{'taken from model 2':>20}{'fraction':>12}{'time (ms)':>12}"
          f"{'equals reference':>18}")
    for backend in backends:
        stats = MergeStats()
        start = time.perf_counter()
        merged = merge_state_dicts(sd1, sd2, args.alpha, backend=backend, stats=stats)
        elapsed = time.perf_counter() - start
        exact = all(torch.equal(merged[k], mod_select_reference(sd1[k], sd2[k], args.alpha))
                    for k in sd1)
        print(f"{backend:<10}{stats.elements_taken:>20,}"
              f"{stats.elements_taken / stats.elements_merged:>12.2e}"
              f"{elapsed * 1e3:>12.1f}{str(exact):>18}")
        if not exact:
            print("modkern demo: error: the merge differs from the reference formula")
            return 1
    return 0
