"""Shared inputs and tolerances for the mix_logits tests.

Tolerances (|got - want| <= ATOL + RTOL * |want|, want computed in float64):
- The output is float32 for every input dtype, and bf16/fp16 logits are exact in float32,
  so the input dtype does not enter the output's error: only float32 arithmetic does.
  That error is (a) the rounding of x - lse, half an ulp of |x - lse| (relative 6e-8, but
  up to 3e-5 absolute at log-probs near -1000: covered by RTOL = 1e-6), and (b) the
  accumulated error of each row's sum of exps, which enters as an absolute error in lse:
  a blocked/pairwise float32 sum of V terms is good to ~log2(V) * 6e-8 relative (pessimistic
  sequential bound V * 6e-8), so ATOL = 2e-5 for V <= 3000 and 1e-4 at V = 151,936.
- Gradients to the logits are rounded to the logits' dtype: one ulp, RTOL = 2**-7 for bf16
  (8 bits of mantissa) and 2**-10 for fp16 (half an ulp for the rounding, the other half
  for float32 error that can move a value across a rounding boundary), 2e-5 for fp32
  (float32 sums over V); plus an ATOL scaled by the largest gradient, since
  g * r - p * c cancels.
- Weight gradients are sums over V of g * p/q, which may be large where a model is much more
  confident than the mixture: compared with RTOL 1e-4 relative to the largest entry.
- Logits of magnitude 1e4 (`big_pair`) keep these same tolerances: every backend subtracts
  the row max m (an input value, exact) before anything else, so x - m is exact or
  rounded to half an ulp of itself (relative 6e-8 < RTOL), and the remaining row constant
  log s is small (|log s| <= log V) and good to ~1e-7 absolute. What would not fit them is
  the float32 logsumexp lse = m + log s: an ulp of 1e4 is 2**-10, so x - lse could be off
  by 5e-4, twenty times ATOL.
"""

from __future__ import annotations

import pytest
import torch

ATOL_OUT = 2e-5
ATOL_OUT_BIG_V = 1e-4
RTOL_OUT = 1e-6
RTOL_GRAD = {torch.float32: 2e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10,
             torch.float64: 1e-10}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NEG_INF = float("-inf")


def logits(shape, dtype=torch.float32, scale=3.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def hard_pair(rows=5, V=1031, dtype=torch.float32, seed=0):
    """Two logits tensors [rows, V] with every edge case of DESIGN 1.2 in some row:
    columns masked in both (-> -inf), columns masked in one, rows with logit gaps of
    1000 (log-probs far below float32's exp range), a row where the two models disagree
    totally (one is confident where the other has e^-200)."""
    l1 = logits((rows, V), torch.float64, seed=seed)
    l2 = logits((rows, V), torch.float64, seed=seed + 1)
    l1[:, :3] = NEG_INF
    l2[:, 1:5] = NEG_INF          # columns 1, 2 masked in both; 0, 3, 4 in one only
    l1[1, 10:] -= 1000.0          # a huge gap inside one model
    l2[2, :V // 2] -= 200.0       # model 2 puts e^-200 where model 1 is confident
    if rows > 3:
        l1[3, 7] += 60.0          # one near-certain token
    return l1.to(dtype), l2.to(dtype)


def assert_close_out(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL_OUT) -> None:
    """Finite entries within tolerance; -inf and NaN exactly where the reference has them."""
    want = want.to(torch.float64)
    got64 = got.to(torch.float64)
    assert got.dtype in (torch.float32, torch.float64)
    assert torch.equal(torch.isnan(got64), torch.isnan(want)), "NaN pattern differs"
    assert torch.equal(got64 == NEG_INF, want == NEG_INF), "-inf pattern differs"
    fin = torch.isfinite(want)
    assert torch.isfinite(got64[fin]).all()
    err = (got64[fin] - want[fin]).abs()
    bound = atol + RTOL_OUT * want[fin].abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}"


def assert_close_grad(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    got, want = got.to(torch.float64), want.to(torch.float64)
    assert torch.isfinite(got).all(), "non-finite gradient"
    scale = want.abs().max().item() or 1.0
    rtol = RTOL_GRAD[dtype]
    err = (got - want).abs()
    bound = rtol * want.abs() + rtol * 0.1 * scale + 1e-7 * scale
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} (scale {scale:.3g})"


def big_pair(rows=6, V=1031, dtype=torch.float32, seed=0):
    """Two logits tensors [rows, V] of magnitude 1e4, every row a different trap: mixed
    signs of +-1e4, a row near +1e4 with -inf masks, a row near -1e4, a row whose tokens
    sit 75 below 40 tokens near +1e4 in one model and far below in the other (the mixture
    underflows float32 there: log-domain fix-ups, with a log sum far from 0), rows where
    the models are offset from each other by 2e4."""
    l1 = logits((rows, V), torch.float64, seed=seed)
    l2 = logits((rows, V), torch.float64, seed=seed + 1)
    sign = torch.randint(0, 2, (V,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    l1[0] += 1e4 * sign
    l2[0] -= 1e4 * sign
    l1[1] += 1e4
    l2[1] += 1e4
    l1[1, :7] = NEG_INF
    l2[1, 3:9] = NEG_INF           # columns 3..6 masked in both
    l1[2] -= 1e4
    l2[2] += 1e4
    l1[3, 40:] += 1e4 - 75.0       # 75 below the 40 tokens near +1e4: q < 1e-30 there
    l1[3, :40] += 1e4
    l2[3] -= 1e4
    l2[3, :40] = 0.0               # model 2 confident where model 1 is too
    if rows > 4:
        l1[4] = -1e4 + l1[4]
        l2[4] = -1e4 - 60.0 * (torch.arange(V) % 3)
    if rows > 5:
        l1[5] += 9999.5
        l2[5, V // 2:] = NEG_INF
    return l1.to(dtype), l2.to(dtype)


MIX_BACKENDS = ("torch", "torch-chunked", "triton")


def _choose_backend(request, monkeypatch) -> str:
    """Every mix backend, each checked against the reference: "torch-chunked" is the torch
    backend with its few-rows path off, so small test tensors also take the row-chunked
    path that many rows take."""
    if request.param == "triton":
        pytest.importorskip("triton")
    if request.param == "torch-chunked":
        from modkern.ops import mix_torch
        monkeypatch.setattr(mix_torch, "FEW_ROWS", 0)
        return "torch"
    return request.param


def backend_fixture():
    """The `backend` fixture of the mix tests (it replaces conftest's in a module that
    binds it: `mix_backend = backend_fixture()`)."""
    return pytest.fixture(name="backend", params=MIX_BACKENDS)(_choose_backend)
