"""Shared inputs and tolerances for the mixture-of-teachers distillation tests.

Every case is checked against modkern.ops.kd_reference (autograd of the formula) run in
float64. Tolerances:
- float64 inputs: the engines and the reference do the same float64 arithmetic in other
  orders: 1e-10.
- float32 (the Triton kernels, the torch engine on float32): each row loss is a sum over V
  of terms whose rounding (~6e-8 relative) accumulates to ~log2(V) * 6e-8 of the largest
  term; log-probs are up to a few tens here, so RTOL 2e-5 of the loss plus ATOL 2e-6.
  Gradients (q - p and q (f - c), each a difference of numbers <= 1) are compared to
  2e-6 plus 1e-4 of the largest entry.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
KINDS = ("forward_kl", "reverse_kl", "jsd")


def randn(shape, seed: int, scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def teachers(rows: int, widths: tuple[int, ...], seed: int = 1) -> list[torch.Tensor]:
    """K teacher logits [rows, V_k] with the edges the loss must keep: columns 1 and 2
    masked in every teacher, columns 0, 3, 4 in some only, a row with a logit gap of 1000
    (probabilities far below float32's range) and one near-certain token."""
    ts = [randn((rows, w), seed + k) for k, w in enumerate(widths)]
    for k, t in enumerate(ts):
        t[:, 1:3] = NEG_INF
        t[:, 0 if k == 0 else 3 + k % 2] = NEG_INF
    ts[0][min(1, rows - 1), 10:] -= 1000.0
    ts[-1][rows - 1, 7] += 40.0
    return ts


def assert_loss_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-10,
                      atol: float = 1e-10) -> None:
    got, want = got.double(), want.double()
    if torch.isnan(want):
        assert torch.isnan(got)
        return
    assert abs(got.item() - want.item()) <= atol + rtol * abs(want.item()), \
        f"loss {got.item()!r} vs reference {want.item()!r}"


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-10,
                      atol: float = 1e-12) -> None:
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "non-finite gradient"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= atol + rtol * scale, f"max gradient error {err:.3g} (scale {scale:.3g})"


F32 = {"rtol": 2e-5, "atol": 2e-6}
F32_GRAD = {"rtol": 1e-4, "atol": 2e-6}
