"""The Triton kernels of mix_logits directly: both forward layouts (one program per row,
vocabulary split across programs) and the split backward against the float64 reference,
a Qwen-sized vocabulary, compilation for a real GPU, CUDA-graph capture.
Tolerances are written down and justified in mix_cases.py."""

from __future__ import annotations

import textwrap

import pytest
import torch
from gpu_compile import compile_in_subprocess
from mix_cases import (ATOL_OUT_BIG_V, NEG_INF, assert_close_grad, assert_close_out, hard_pair,
                       logits)

from modkern import mix_logits
from modkern.ops.mix_reference import mix_logits_many_reference, weight_grad_reference

pytest.importorskip("triton")
km = pytest.importorskip("modkern.kernels.mix_logits")

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


@pytest.mark.parametrize("splits", [None, 1, 2, 5])
def test_forward_layouts_and_split_backward(device, splits):
    """splits=None on 6 rows takes the one-program-per-row kernel (6 rows fill the
    interpreter's 4 'SMs'); 1, 2, 5 force the split-vocabulary kernels."""
    l1, l2 = hard_pair(rows=6, V=2 * km.BLOCK + 37, dtype=torch.bfloat16)
    l3 = logits((6, 2 * km.BLOCK + 37), torch.float16, seed=9)
    ls = [l1.to(device), l2.to(device), l3.to(device)]
    w = torch.softmax(logits((6, 3), seed=1), -1)
    w[0] = torch.tensor([0.0, 1.0, 0.0])
    out, stats = km.forward(ls, w.to(device), n_valid=None, splits=splits)
    ref_in = [t.double() for t in (l1, l2, l3)]
    want = mix_logits_many_reference(ref_in, list(w.double().unbind(-1)))
    assert_close_out(out.cpu(), want)
    # the row statistics: each row's max exactly, and log sum exp(x - max)
    assert torch.equal(stats[..., 0].cpu(), torch.stack([t.float().amax(-1) for t in ls], -1))
    log_sums = [torch.log(torch.exp(t - t.amax(-1, keepdim=True)).sum(-1)) for t in ref_in]
    assert_close_out(stats[..., 1].cpu(), torch.stack(log_sums, -1))

    g = logits((6, l1.shape[1]), seed=2).where(torch.isfinite(want), 0.0)
    grads, gw = km.backward(ls, w.to(device), stats, g.float().to(device), None, need_w=True,
                            splits=splits)
    rin = [t.detach().requires_grad_() for t in ref_in]
    mix_logits_many_reference(rin, list(w.double().unbind(-1))).mul(g).nan_to_num(
        0.0, 0.0, 0.0).sum().backward()
    for got, r, dt in zip(grads, rin, (torch.bfloat16, torch.bfloat16, torch.float16)):
        assert got.dtype == dt
        assert_close_grad(got.cpu(), r.grad, dt)
    assert_close_grad(gw.cpu(), weight_grad_reference(ref_in, list(w.double().unbind(-1)), g),
                      torch.float32)


def test_split_forward_pads_n_valid(device):
    l1, l2 = logits((2, 3000), seed=1).to(device), logits((2, 3000), seed=2).to(device)
    w = torch.tensor([[0.3, 0.7]], device=device)
    out, _ = km.forward([l1, l2], w, n_valid=2100, splits=3)  # last span all padding
    assert (out[:, 2100:] == NEG_INF).all()
    want = mix_logits_many_reference([l1[:, :2100].cpu().double(), l2[:, :2100].cpu().double()],
                                     [0.3, 0.7])
    assert_close_out(out[:, :2100].cpu(), want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qwen_vocabulary(device, backend, monkeypatch):
    """V = 151,936 (Qwen2.5's head): no 64K limit anywhere; two rows, decoding layout."""
    V = 151_936
    if device == "cpu":  # the interpreter pays per block: fewer, larger blocks
        monkeypatch.setattr(km, "BLOCK", 16384)
    l1 = logits((2, V), torch.bfloat16, seed=1).to(device).requires_grad_()
    l2 = logits((2, V), torch.bfloat16, seed=2).to(device).requires_grad_()
    alpha = torch.tensor([0.5, 0.05], device=device)
    out = mix_logits(l1, l2, alpha, backend=backend, n_valid=151_665)
    want = mix_logits_many_reference(
        [l1.detach()[:, :151_665].cpu().double(), l2.detach()[:, :151_665].cpu().double()],
        [alpha.cpu().double(), 1 - alpha.cpu().double()])
    assert_close_out(out[:, :151_665].detach().cpu(), want, atol=ATOL_OUT_BIG_V)
    assert (out[:, 151_665:] == NEG_INF).all()
    # nll of one token per row: gradient = r_k * (onehot - p_k)
    tok = torch.tensor([5, 150_000], device=device)
    out.gather(1, tok[:, None]).sum().backward()
    assert torch.isfinite(l1.grad.float()).all() and (l1.grad[:, 151_665:] == 0).all()
    assert abs(l1.grad.float().sum().item()) < 1e-3  # softmax gradients sum to 0 per row


def test_kernels_compile_for_a_gpu():
    """CI has no GPU: compile every kernel to PTX for sm_90 (with the GPU's code generator,
    not the interpreter) to catch what the interpreter accepts but the compiler does not.
    Each kernel for K = 2 (the common case, a kernel of its own) and another K, with the
    logits (and gradients) in mixed dtypes."""
    code = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import modkern.kernels.mix_logits as km

        DTYPES = ("*bf16", "*fp16", "*fp32", "*bf16")

        def signature(fn, K):
            types = {"xs": DTYPES[:K], "grads": DTYPES[:K], "x_row_strides": ("i64",) * K}
            types.update({n: "i32" for n in ("n_valid", "V", "span")})
            return {n: types.get(n, "*fp32" if n.endswith("_ptr") else
                                 "constexpr" if n.isupper() else "i64")
                    for n in fn.arg_names}

        kernels = [(km.mix_forward_row_kernel, {}), (km.mix_partial_stats_kernel, {}),
                   (km.mix_forward_span_kernel, {"SPLITS": 64}),
                   (km.mix_forward_given_stats_kernel, {}),
                   (km.mix_backward_sums_kernel, {}), (km.mix_backward_grads_kernel, {})]
        n = 0
        for fn, const in kernels:
            for K in (2, 3, 4):
                const = {**const, "K": K, "BLOCK": 4096}
                src = ASTSource(fn, signature(fn, K), constexprs=const)
                ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                     options={"num_warps": 8}).asm["ptx"]
                assert ".target sm_90" in ptx
                n += 1
        print("compiled", n)
    """)
    assert "compiled 18" in compile_in_subprocess(code)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decoding_step_captures_in_a_cuda_graph():
    l1 = torch.randn(8, 151_936, device="cuda", dtype=torch.bfloat16)
    l2 = torch.randn(8, 151_936, device="cuda", dtype=torch.bfloat16)
    out = mix_logits(l1, l2, 0.5)  # warm-up: compiles the kernels, caches the weights
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mix_logits(l1, l2, 0.5)
    l1.copy_(torch.randn_like(l1))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(captured, mix_logits(l1, l2, 0.5), atol=1e-5)
    assert not torch.equal(captured, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decoding_step_with_tensor_alpha_captures_with_check_false():
    """A tensor alpha (one weight per row) read by the kernels on the device: with
    check=False nothing is read on the host, so the step captures, and a replay uses the
    alpha of the moment. (check=True refusing a capture: test_mix_logits_checks.py.)"""
    l1 = torch.randn(8, 151_936, device="cuda", dtype=torch.bfloat16)
    l2 = torch.randn(8, 151_936, device="cuda", dtype=torch.bfloat16)
    alpha = torch.linspace(0.1, 0.9, 8, device="cuda")
    mix_logits(l1, l2, alpha, check=False)  # warm-up: compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mix_logits(l1, l2, alpha, check=False)
    alpha.copy_(torch.linspace(0.9, 0.1, 8, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(captured, mix_logits(l1, l2, alpha), atol=1e-5)
