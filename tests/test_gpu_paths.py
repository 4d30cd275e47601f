"""The GPU paths end to end on `device` (the GPU when there is one; here the CPU, with the
Triton kernels interpreted): what bench/gpu_check.py's CUDA pass adds to the other
device-parametrised tests.

- the select at GPU-filling sizes (many more blocks than multiprocessors), every dtype and
  precision, out of place, into out= and in place, bit for bit against the torch backend;
- mix_logits forward and backward with per-row alpha on both kernel layouts (few rows: the
  vocabulary split across programs; more rows than multiprocessors: a program per row);
- merge_state_dicts on the device (both precisions, in place with tied weights, MergeStats)
  against the CPU torch backend: the device counterpart of the CPU-tensor tests of
  test_merge_state_dicts.py that gpu_check.py leaves out of the CUDA pass for Triton;
- a checkpoint merge with device=DEVICE, in process and through `modkern merge --device`;
- mixture decoding with both tiny models on the device.
"""

from __future__ import annotations

import pytest
import torch
from _checkpoints import ckpts, load_folder, run_cli  # noqa: F401  (session fixture)
from mix_cases import ATOL_OUT_BIG_V, assert_close_grad, assert_close_out, hard_pair, logits
from oracle_select import FLOAT_DTYPES, SHORT_NAME, assert_bits_equal

import modkern
from modkern import MergeStats
from modkern.ops.mix_reference import mix_logits_reference

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

CUDA = torch.cuda.is_available()
# On a GPU: 4M elements (1,024 blocks of 4,096); interpreted on the CPU: a few blocks.
SELECT_N = 2 ** 22 + 3 if CUDA else 3 * 4096 + 5
# (rows, V): on a GPU, Qwen2.5's head on 2 rows (the vocabulary split across programs) and
# 600 rows (more than 4 programs per SM of an H200's 132: a program per row); interpreted,
# 3 and 6 rows (the interpreter counts as 4 programs).
MIX_SHAPES = [(2, 151_936), (600, 8_229)] if CUDA else [(3, 3000), (6, 3000)]


def _weights(n: int, dtype, seed: int, device: str) -> torch.Tensor:
    """N(0, 0.02) weights with ties at the min and the max."""
    t = logits((n,), torch.float64, scale=0.02, seed=seed)
    if n >= 4:
        t[[0, n // 2]] = t.min() - 0.01
        t[[1, n - 1]] = t.max() + 0.01
    return t.to(dtype).to(device)


@pytest.mark.parametrize("precision", ["exact", "reference"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=[SHORT_NAME[d] for d in FLOAT_DTYPES])
def test_select_at_gpu_sizes_every_mode(device, dtype, precision):
    t1, t2 = _weights(SELECT_N, dtype, 1, device), _weights(SELECT_N, dtype, 2, device)
    for alpha in (0.9, 0.3):
        want = modkern.mod_select(t1.cpu(), t2.cpu(), alpha, backend="torch",
                                  precision=precision)
        kw = dict(backend="triton", precision=precision)
        assert_bits_equal(modkern.mod_select(t1, t2, alpha, **kw), want, "out of place")
        out = torch.full_like(t1, 7.0)
        modkern.mod_select(t1, t2, alpha, out=out, **kw)
        assert_bits_equal(out, want, "out=")
        work = t1.clone()
        modkern.mod_select_(work, t2, alpha, **kw)
        assert_bits_equal(work, want, "in place")


@pytest.mark.parametrize("rows, V", MIX_SHAPES, ids=[f"{r}x{v}" for r, v in MIX_SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_mix_logits_both_layouts_forward_backward(device, rows, V, dtype):
    l1, l2 = hard_pair(rows=rows, V=V, dtype=dtype)
    alpha = torch.linspace(0.05, 0.95, rows).double()  # float32 values, as the kernel sees
    g = logits((rows, V), seed=3)
    ins = [t.to(device).requires_grad_() for t in (l1, l2, alpha.float())]
    out = modkern.mix_logits(*ins, backend="triton")
    refs = [t.detach().double().requires_grad_() for t in (l1, l2, alpha)]
    want = mix_logits_reference(*refs)
    assert_close_out(out.detach().cpu(), want.detach(), atol=ATOL_OUT_BIG_V)
    fin = torch.isfinite(want.detach())
    out.backward(g.where(fin, 0.0).float().to(device))
    want.backward(g.double().where(fin, 0.0))
    for got, ref, dt in zip(ins, refs, (dtype, dtype, torch.float32)):
        assert_close_grad(got.grad.cpu(), ref.grad, dt)


def _state_dict(seed: int, device: str) -> dict[str, torch.Tensor]:
    """Small and multi-block tensors of three float dtypes, an integer buffer, and an
    lm_head tied to the embedding (one object) and a norm tied by a view of its storage."""
    sd = {f"layers.{i}.w": _weights(n, dt, seed + i, device)
          for i, (n, dt) in enumerate([(7, torch.bfloat16), (4097, torch.bfloat16),
                                       (3 * 4096 + 5, torch.bfloat16), (300, torch.float16),
                                       (5000, torch.float32), (1, torch.float32)])}
    sd["embed.weight"] = _weights(64 * 33, torch.bfloat16, seed + 10, device).view(64, 33)
    sd["lm_head.weight"] = sd["embed.weight"]
    sd["norm.weight"] = _weights(65, torch.float32, seed + 11, device)
    sd["final_norm.weight"] = sd["norm.weight"][:]
    sd["steps"] = torch.arange(5, device=device)
    return sd


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("precision", ["exact", "reference"])
def test_merge_state_dicts_on_device(device, precision, inplace):
    sd1, sd2 = _state_dict(0, device), _state_dict(20, device)
    alpha = {"layers.1.": 0.3, "embed": 0.5, "lm_head": 0.5, "*": 0.9}  # tied: one alpha
    cpu = {k: v.cpu() for k, v in sd1.items()}
    cpu["lm_head.weight"], cpu["final_norm.weight"] = cpu["embed.weight"], cpu["norm.weight"][:]
    want_stats, stats = MergeStats(), MergeStats()
    want = modkern.merge_state_dicts(cpu, {k: v.cpu() for k, v in sd2.items()}, alpha,
                                     backend="torch", precision=precision, stats=want_stats)
    got = modkern.merge_state_dicts(sd1, sd2, alpha, inplace=inplace, backend="triton",
                                    precision=precision, stats=stats)
    assert list(got) == list(want)
    for k in want:
        assert got[k].device.type == torch.device(device).type, k
        assert_bits_equal(got[k], want[k], k)
    taken = stats.taken_by_key
    assert taken and taken == {k: n for k, n in want_stats.taken_by_key.items() if k in taken}
    if not inplace:
        assert (stats.tensors_merged, stats.elements_taken) == \
            (want_stats.tensors_merged, want_stats.elements_taken)
    else:  # a tied pair is merged (and counted) once
        assert stats.tensors_merged == want_stats.tensors_merged - 2
        assert got is sd1 and got["lm_head.weight"] is got["embed.weight"]
        assert got["final_norm.weight"].data_ptr() == got["norm.weight"].data_ptr()


@pytest.mark.parametrize("alpha, precision", [(0.9, "exact"), (0.3, "reference")])
def test_checkpoint_merge_on_device(ckpts, tmp_path, device, alpha, precision):  # noqa: F811
    base, other = ckpts["llama_a"], ckpts["llama_b"]
    report = modkern.merge_checkpoints(base, other, tmp_path / "out", alpha, device=device,
                                       precision=precision, progress=False)
    want = modkern.merge_state_dicts(load_folder(base), load_folder(other), alpha,
                                     backend="torch", precision=precision)
    got = load_folder(tmp_path / "out")
    assert got.keys() == want.keys() and report.elements_taken > 0
    for k in want:
        assert_bits_equal(got[k], want[k], k)


def test_cli_merge_on_device(ckpts, tmp_path, device):  # noqa: F811
    base, other = ckpts["qwen_a"], ckpts["qwen_b"]
    r = run_cli("merge", base, other, tmp_path / "out", "--alpha", "0.9", "--device", device,
                "--quiet")
    assert r.returncode == 0, r.stderr
    want = modkern.merge_state_dicts(load_folder(base), load_folder(other), 0.9,
                                     backend="torch")
    got = load_folder(tmp_path / "out")
    assert got.keys() == want.keys()
    for k in want:
        assert_bits_equal(got[k], want[k], k)


def _greedy(model, enc, new: int, **kw) -> torch.Tensor:
    out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         eos_token_id=1, **kw)
    return out if kw.get("return_dict_in_generate") else out[:, enc["input_ids"].shape[1]:]


def test_mixture_decoding_on_device(device):
    pytest.importorskip("transformers")
    from transformers import LogitsProcessorList

    from modkern.decoding.generation import MixtureOfDistributions
    from modkern.demo.toy import char_tokenizer, tiny_causal_lm

    tok = char_tokenizer("0123456789+=abcdefghlo ")
    m1 = tiny_causal_lm(len(tok), seed=1).to(device)
    m2 = tiny_causal_lm(len(tok), arch="llama", seed=2).to(device)
    prompts, new = ["12+3=", "a", "hello abc"], 5
    for alpha, model in ((1.0, m1), (0.0, m2)):  # the end weights are each model alone
        got = modkern.generate(m1, m2, tok, prompts, alpha, max_new_tokens=new,
                               return_tensors=True)
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True).to(device)
        assert torch.equal(got, _greedy(model, enc, new))
    proc = MixtureOfDistributions(m2, 0.3, attention_mask=enc["attention_mask"])
    out = _greedy(m1, enc, new, output_scores=True, return_dict_in_generate=True,
                  logits_processor=LogitsProcessorList([proc]))
    length = enc["input_ids"].shape[1]
    for step, scores in enumerate(out.scores):  # the mixture of uncached forwards
        ids = out.sequences[:, :length + step]
        mask = torch.cat([enc["attention_mask"], torch.ones_like(ids[:, length:])], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            lg = [m(input_ids=ids, attention_mask=mask, position_ids=pos,
                    use_cache=False).logits[:, -1].double().cpu() for m in (m1, m2)]
        want = mix_logits_reference(lg[0], lg[1], 0.3)
        assert scores.device.type == torch.device(device).type
        torch.testing.assert_close(scores.double().cpu(), want, atol=2e-5, rtol=1e-5)
