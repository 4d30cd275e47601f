"""Mixture of distributions over logits: the specification (docs/design.md 1.2), in plain torch.

    out = log(alpha * softmax(l1) + (1 - alpha) * softmax(l2))          over the last dim
        = logaddexp(log(alpha) + log_softmax(l1), log(1 - alpha) + log_softmax(l2))

and for K models `logsumexp_k(log w_k + log_softmax(l_k))`, evaluated in float32 (float64
for float64 input) in the stable log domain. Autograd differentiates it directly; the fused
backends are tested against it (run in float64).

Edge cases, and how the formula keeps them (and their gradients) clean:
- a weight of 0 drops its model exactly: its term is -inf by `where`, never log(0) + lp
  (the unselected branch still sees a finite log(1), so no 0 * inf reaches the gradient);
  alpha = 1 gives log_softmax(l1) and l2 may even be NaN;
- a column at -inf in every model gives -inf; the log-sum-exp is shifted by a finite max,
  so its gradient there is 0, not NaN (torch.logaddexp(-inf, -inf) has a NaN gradient);
- autograd of this formula gives 0 for the derivative with respect to a weight that is
  exactly 0 (the `where` cuts it); the true derivative there, d out_j / d w_k = p_kj / q_j,
  is what modkern's backends return: `weight_grad_reference` spells it out;
- a row that log_softmax turns to NaN (all -inf, NaN inside) in a model with non-zero weight
  gives NaN, as torch does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def mix_logits_many_reference(logits: Sequence[torch.Tensor],
                              weights: Sequence[float | torch.Tensor]) -> torch.Tensor:
    """log(sum_k weights[k] * softmax(logits[k])) over the last dim, as float32 (float64
    for float64 input). weights[k]: a float or a tensor broadcast over the leading dims."""
    cd = _compute_dtype(*logits, *(w for w in weights if isinstance(w, torch.Tensor)))
    dev = logits[0].device
    terms = []
    for l, w in zip(logits, weights):
        w = torch.as_tensor(w, dtype=cd, device=dev)
        if w.dim() > 0:
            w = w.unsqueeze(-1)  # one weight per row, broadcast over the vocabulary
        lp = torch.log_softmax(l.to(cd), dim=-1)
        on = w > 0
        terms.append(torch.where(on, torch.log(torch.where(on, w, 1.0)) + lp, float("-inf")))
    t = torch.stack(terms)
    m = t.amax(dim=0).detach()
    live = m != float("-inf")  # NaN stays live: a NaN row gives NaN
    m = torch.where(live, m, 0.0)
    s = torch.exp(t - m).sum(dim=0)
    return torch.where(live, m + torch.log(torch.where(live, s, 1.0)), float("-inf"))


def mix_logits_reference(l1: torch.Tensor, l2: torch.Tensor,
                         alpha: float | torch.Tensor) -> torch.Tensor:
    """log(alpha*softmax(l1) + (1-alpha)*softmax(l2)) over the last dim, as float32
    log-probabilities (float64 for float64 inputs). alpha: a float, or a tensor broadcast
    over the leading dims (one weight per row)."""
    return mix_logits_many_reference([l1, l2], [alpha, 1 - alpha])


def weight_grad_reference(logits: Sequence[torch.Tensor], weights: Sequence[float | torch.Tensor],
                          grad_out: torch.Tensor) -> torch.Tensor:
    """d/dw_k of sum(grad_out * out), per row: sum_j grad_out_j * p_kj / q_j, shape
    [..., K] (the true derivative, also at w_k = 0; 0 where grad_out is 0)."""
    out = mix_logits_many_reference(logits, weights)
    cd = out.dtype
    cols = []
    for l in logits:
        lp = torch.log_softmax(l.to(cd), dim=-1)
        e = torch.where((grad_out == 0) | (lp == float("-inf")), 0.0, torch.exp(lp - out))
        cols.append((grad_out.to(cd) * e).sum(-1))
    return torch.stack(cols, dim=-1)
