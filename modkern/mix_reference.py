"""Mixture of distributions over logits: the specification (DESIGN.md 1.2), in plain torch.

    out = log(alpha * softmax(l1) + (1 - alpha) * softmax(l2))          over the last dim
        = logaddexp(log(alpha) + log_softmax(l1), log(1 - alpha) + log_softmax(l2))

evaluated in float32 (float64 for float64 input) in the stable logaddexp form. Autograd
differentiates it directly; the fused kernels are tested against it.
"""

from __future__ import annotations

import torch


def mix_logits_reference(l1: torch.Tensor, l2: torch.Tensor,
                         alpha: float | torch.Tensor) -> torch.Tensor:
    """log(alpha*softmax(l1) + (1-alpha)*softmax(l2)) over the last dim, as float32
    log-probabilities (float64 for float64 inputs). alpha: a float, or a tensor broadcast
    over the leading dims (one weight per row)."""
    cd = torch.float64 if torch.float64 in (l1.dtype, l2.dtype) else torch.float32
    a = torch.as_tensor(alpha, dtype=cd, device=l1.device)
    if a.dim() > 0:
        a = a.unsqueeze(-1)  # one weight per row, broadcast over the vocabulary
    lp1 = torch.log_softmax(l1.to(cd), dim=-1)
    lp2 = torch.log_softmax(l2.to(cd), dim=-1)
    # log(0) = -inf: an end weight drops its model exactly (alpha = 1 gives log_softmax(l1)).
    # where() rather than arithmetic keeps -inf + -inf from meeting inf - inf.
    t1 = torch.where(a > 0, torch.log(a) + lp1, torch.full_like(lp1, float("-inf")))
    t2 = torch.where(a < 1, torch.log1p(-a) + lp2, torch.full_like(lp2, float("-inf")))
    return torch.logaddexp(t1, t2)
