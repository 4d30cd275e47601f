"""Bad input to the weight select gets one clear exception (docs/design.md 6) naming the key and
the model, and an in-place select that raises leaves t1 exactly as it was."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import modkern
from modkern import (AlphaError, BackendError, DTypeError, ModkernError, NonFiniteError,
                     ShapeMismatchError)
from oracle_select import assert_bits_equal, oracle_select

KEY = "model.layers.3.mlp.up_proj.weight"


def pair(n=10, dtype=torch.float32, device="cpu"):
    t1 = torch.linspace(-1, 1, n, dtype=torch.float64).to(dtype).to(device)
    t2 = torch.full((n,), 3.0, dtype=dtype, device=device)
    return t1, t2


def all_forms(t1, t2, alpha, backend, **kw):
    """Call each form of the select; yields (form name, callable)."""
    yield "mod_select", lambda: modkern.mod_select(t1, t2, alpha, backend=backend, name=KEY, **kw)
    yield "out=", lambda: modkern.mod_select(t1, t2, alpha, backend=backend, name=KEY,
                                             out=torch.empty_like(t1), **kw)
    yield "mod_select_", lambda: modkern.mod_select_(t1, t2, alpha, backend=backend, name=KEY,
                                                     **kw)
    yield "merge", lambda: modkern.merge_state_dicts({KEY: t1}, {KEY: t2}, alpha,
                                                     backend=backend, **kw)
    yield "merge inplace", lambda: modkern.merge_state_dicts({KEY: t1}, {KEY: t2}, alpha,
                                                             backend=backend, inplace=True, **kw)


def test_errors_are_modkern_errors():
    for cls in (AlphaError, BackendError, DTypeError, NonFiniteError, ShapeMismatchError):
        assert issubclass(cls, ModkernError)


def test_shape_mismatch(backend, device):
    t1, _ = pair(device=device)
    t2 = torch.zeros(11, device=device)
    for form, call in all_forms(t1, t2, 0.5, backend):
        with pytest.raises(ShapeMismatchError) as e:
            call()
        msg = str(e.value)
        assert KEY in msg and "model 1" in msg and "model 2" in msg, (form, msg)
        assert "[10]" in msg and "[11]" in msg, (form, msg)


@pytest.mark.parametrize("bad_dtype", [torch.int32, torch.int64, torch.int8, torch.bool,
                                       torch.complex64])
@pytest.mark.parametrize("which", ["t1", "t2"])
def test_non_floating_tensor(which, bad_dtype, backend, device):
    t1, t2 = pair(device=device)
    if which == "t1":
        t1 = t1.to(bad_dtype)
    else:
        t2 = t2.to(bad_dtype)
    model = "model 1" if which == "t1" else "model 2"
    for form, call in all_forms(t1, t2, 0.5, backend):
        with pytest.raises(DTypeError) as e:
            call()
        assert KEY in str(e.value) and model in str(e.value), (form, str(e.value))


@pytest.mark.parametrize("alpha", [-0.1, -1e-300, 1.0000001, 2, math.nan, math.inf, -math.inf,
                                   True, False, "0.5", None, [0.5], torch.tensor([0.2, 0.3])])
def test_bad_alpha(alpha, backend, device):
    t1, t2 = pair(device=device)
    before = t1.clone()
    for form, call in all_forms(t1, t2, alpha, backend):
        with pytest.raises(AlphaError) as e:
            call()
        assert "alpha" in str(e.value), form
    assert_bits_equal(t1, before, "t1 unchanged")


@pytest.mark.parametrize("alpha", [0, 1, 0.5, np.float32(0.9), np.float64(0.1),
                                   torch.tensor(0.9), torch.tensor([0.25])])
def test_alpha_accepted_forms(alpha):
    t1, t2 = pair()
    expected = oracle_select(t1, t2, float(alpha))
    assert_bits_equal(modkern.mod_select(t1, t2, alpha), expected, repr(alpha))


def test_bad_precision():
    t1, t2 = pair()
    with pytest.raises(ValueError, match="precision"):
        modkern.mod_select(t1, t2, 0.5, precision="fast")
    with pytest.raises(ValueError, match="precision"):
        modkern.merge_state_dicts({"w": t1}, {"w": t2}, 0.5, precision="bf16")


def test_bad_out(device):
    t1, t2 = pair(device=device)
    for out in (torch.empty(11, device=device), torch.empty(10, dtype=torch.float64,
                                                            device=device)):
        with pytest.raises(ShapeMismatchError, match="out"):
            modkern.mod_select(t1, t2, 0.5, out=out, name=KEY)


def test_unknown_backend():
    t1, t2 = pair()
    with pytest.raises(BackendError, match="backend"):
        modkern.mod_select(t1, t2, 0.5, backend="cuda")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 7, 5000])  # first element, last, a later Triton block
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_finite_in_t1(bad, where, dtype, backend, device):
    n = 5001 if where == 5000 else 8
    t1, t2 = pair(n, dtype, device)
    t1[where] = bad
    before = t1.clone()
    for form, call in all_forms(t1, t2, 0.5, backend):
        with pytest.raises(NonFiniteError) as e:
            call()
        msg = str(e.value)
        assert KEY in msg and "model 1" in msg and str(where) in msg, (form, msg)
        assert_bits_equal(t1, before, f"{form}: t1 unchanged")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_non_finite_in_t2_where_selected(bad, dtype, backend, device):
    n = 9000  # two Triton blocks; the bad value sits in the second
    t1, t2 = pair(n, dtype, device)
    t2[8999] = bad  # t1's maximum is at 8999: always taken from t2 for alpha <= 1
    t2[5] = bad  # not selected at alpha 0.9: harmless
    before = t1.clone()
    for form, call in all_forms(t1, t2, 0.9, backend):
        with pytest.raises(NonFiniteError) as e:
            call()
        msg = str(e.value)
        assert KEY in msg and "model 2" in msg and "8999" in msg, (form, msg)
        assert_bits_equal(t1, before, f"{form}: t1 unchanged")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_in_t2_not_selected_is_fine(bad, backend, device):
    t1, t2 = pair(9000, torch.float32, device)
    t2[:4000] = bad  # t1 is below the threshold there: t2 is never read at those places
    t2[8000] = bad
    expected = oracle_select(t1, torch.where(torch.isfinite(t2), t2, 0.0), 0.9)
    assert not torch.isfinite(t2[8000])
    for form, call in list(all_forms(t1.clone(), t2, 0.9, backend))[:3]:
        assert_bits_equal(call(), expected, form)
    # alpha 0 takes everything from t2: now the bad values are selected
    with pytest.raises(NonFiniteError, match="model 2"):
        modkern.mod_select(t1, t2, 0.0, backend=backend, name=KEY)


def test_t2_overflowing_t1_dtype_is_non_finite(backend, device):
    # a finite float32 t2 value beyond bf16's range would become inf in the bf16 output
    t1 = torch.tensor([0.0, 1.0], dtype=torch.bfloat16, device=device)
    t2 = torch.tensor([0.0, 3.4e38], dtype=torch.float32, device=device)
    with pytest.raises(NonFiniteError, match="model 2"):
        modkern.mod_select(t1, t2, 0.5, backend=backend, name=KEY)


def test_merge_inplace_error_leaves_that_tensor_unchanged(backend, device):
    a1, a2 = pair(20, torch.float32, device)
    b1, b2 = pair(20, torch.float32, device)
    b2[-1] = math.nan  # selected: the merge of "b" fails
    sd1, sd2 = {"a": a1, "b": b1}, {"a": a2, "b": b2}
    b_before = b1.clone()
    with pytest.raises(NonFiniteError, match="'b'"):
        modkern.merge_state_dicts(sd1, sd2, 0.5, inplace=True, backend=backend)
    assert_bits_equal(sd1["b"], b_before, "b unchanged")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only rule")
def test_triton_on_cpu_without_interpreter_is_a_backend_error():
    pytest.importorskip("triton")
    # a fresh interpreter without TRITON_INTERPRET (it must be set before triton is
    # imported); then "0" and "" (both mean off), each before triton was ever imported
    code = textwrap.dedent("""
        import os, torch, modkern
        for value in (None, "0", ""):
            if value is not None:
                os.environ["TRITON_INTERPRET"] = value
            try:
                modkern.mod_select(torch.zeros(3), torch.ones(3), 0.5, backend="triton")
            except modkern.BackendError as e:
                print("BackendError:", e)
            else:
                print("no error")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("BackendError:") for line in lines), \
        done.stdout + done.stderr
    assert all("TRITON_INTERPRET" in line for line in lines)
