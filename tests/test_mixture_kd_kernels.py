"""The Triton kernel of the mixture-of-teachers loss (under the interpreter on the CPU):
forward and backward against the float64 reference for every kind and temperature, masks,
vocabulary cuts, 1 to 5 teachers, the fused form, bf16, and compilation for a real GPU."""

from __future__ import annotations

import pytest
import torch
from gpu_compile import compile_in_subprocess
from kd_cases import F32, F32_GRAD, KINDS, assert_grad_close, assert_loss_close, randn, teachers

from modkern import fused_linear_mixture_kd, mixture_kd_loss
from modkern.ops.kd_reference import mixture_kd_reference

pytest.importorskip("triton")
km = pytest.importorskip("modkern.kernels.mixture_kd")

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]
W2 = [0.3, 0.7]


def _run(device, s, ts, weights, **kw):
    x = s.float().to(device).requires_grad_()
    loss = mixture_kd_loss(x, [t.float().to(device) for t in ts], weights, backend="triton",
                           **kw)
    loss.backward()
    ref = s.double().clone().requires_grad_()
    mask = kw.pop("mask", None)
    kw.pop("chunk_rows", None)
    want = mixture_kd_reference(ref, [t.double() for t in ts], weights,
                                mask=None if mask is None else mask.cpu(), **kw)
    want.backward()
    assert_loss_close(loss.cpu(), want, **F32)
    assert_grad_close(x.grad.cpu(), ref.grad, **F32_GRAD)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(device, kind, temperature):
    """V spans several blocks and ends mid-block; columns masked in every teacher; a row
    with a logit gap of 1000; a masked row; a teacher wider than the student."""
    V = 2 * (km.TILE // 2) + 37
    s = randn((5, V), seed=0)
    ts = teachers(5, (V + 6, V))
    keep = torch.tensor([True, True, False, True, True], device=device)
    _run(device, s, ts, W2, kind=kind, temperature=temperature, mask=keep, chunk_rows=2,
         scale_t2=True)


@pytest.mark.parametrize("K", [1, 3, 5])
def test_teacher_counts(device, K):
    V = 300
    s = randn((3, V), seed=1)
    ts = [randn((3, V), seed=2 + k) for k in range(K)]
    weights = [1.0 / K] * K
    if K > 1:
        weights = [0.0] + [1.0 / (K - 1)] * (K - 1)  # a teacher of weight 0 is dropped
        ts[0][:] = float("nan")
    _run(device, s, ts, weights, kind="jsd")


def test_fused_matches_unfused_torch(device):
    h = randn((9, 16), seed=1, scale=1.0, dtype=torch.float32).to(device).requires_grad_()
    w = randn((700, 16), seed=2, scale=0.5, dtype=torch.float32).to(device).requires_grad_()
    th = randn((9, 8), seed=3, dtype=torch.float32).to(device)
    tw = randn((710, 8), seed=4, scale=0.5, dtype=torch.float32).to(device)
    t2 = randn((9, 700), seed=5, dtype=torch.float32).to(device)
    labels = torch.tensor([1, -100, 3, 4, 5, 6, -100, 8, 9], device=device)
    loss = fused_linear_mixture_kd(h, w, [(th, tw), t2], W2, mask=labels, kind="reverse_kl",
                                   backend="triton", chunk_rows=4)
    loss.backward()
    h2, w2 = (x.detach().clone().requires_grad_() for x in (h, w))
    want = mixture_kd_loss(h2 @ w2.T, [th @ tw.T, t2], W2, mask=labels, kind="reverse_kl",
                           backend="torch")
    want.backward()
    assert_loss_close(loss.cpu(), want.cpu(), **F32)
    assert_grad_close(h.grad.cpu(), h2.grad.cpu(), **F32_GRAD)
    assert_grad_close(w.grad.cpu(), w2.grad.cpu(), **F32_GRAD)


def test_bf16_logits(device):
    s = randn((4, 400), seed=1, dtype=torch.bfloat16).to(device).requires_grad_()
    t = randn((4, 400), seed=2, dtype=torch.bfloat16).to(device)
    loss = mixture_kd_loss(s, [t], [1.0], backend="triton")
    loss.backward()
    assert s.grad.dtype == torch.bfloat16
    ref = s.detach().double().cpu().requires_grad_()
    want = mixture_kd_reference(ref, [t.double().cpu()], [1.0])
    want.backward()
    assert_loss_close(loss.cpu(), want, **F32)
    assert_grad_close(s.grad.cpu(), ref.grad, rtol=2 ** -7)


def test_all_rows_masked_and_nan_rows(device):
    s = randn((2, 50), seed=1, dtype=torch.float32).to(device).requires_grad_()
    t = randn((2, 50), seed=2, dtype=torch.float32).to(device)
    loss = mixture_kd_loss(s, [t], [1.0], backend="triton",
                           mask=torch.zeros(2, dtype=torch.bool, device=device))
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()
    t[0] = float("-inf")  # no teacher mass: NaN, as log_softmax gives
    assert torch.isnan(mixture_kd_loss(s, [t], [1.0], backend="triton"))


def test_kernel_compiles_for_a_gpu():
    """CI has no GPU: compile the kernel to PTX for sm_90 for every kind, with and without
    the gradient, bf16 and fp32 logits."""
    code = """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import modkern.kernels.mixture_kd as km
        fn = km._kd_row_kernel
        count = 0
        for dt in ("bf16", "fp32"):
            for kind in range(3):
                for write in (False, True):
                    const = {"K": 3, "KP": 4, "KIND": kind, "WRITE_GRAD": write,
                             "BLOCK": km.TILE // 4}
                    types = {"s_ptr": f"*{dt}", "t_ptr": f"*{dt}", "g_ptr": f"*{dt}",
                             "w_ptr": "*fp32", "loss_ptr": "*fp32", "inv_t": "fp32",
                             "grad_scale": "fp32", "V": "i32"}
                    sig = {n: ("constexpr" if n in const else types.get(n, "i64"))
                           for n in fn.arg_names}
                    triton.compile(ASTSource(fn, sig, constexprs=const),
                                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
                    count += 1
        print("compiled", count)
    """
    assert "compiled 12" in compile_in_subprocess(code)
