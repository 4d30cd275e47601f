"""`mod_select` and `mod_select_`: the MoD weight select of one tensor pair, validated and
dispatched to a backend.

Both backends run the same two steps (see select_torch.py): a min/max pass over t1 that,
out of place, also copies t1 into the output; then a patch pass that writes t2's elements
where `t1 >= v`, v being the exact threshold of select_reference.select_threshold. The torch
backend runs a few vectorized torch ops per step, the Triton backend one kernel.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from ..backends import kernel_module, resolve_backend
from ..checks import FLOAT_DTYPES, check_alpha, check_precision
from ..errors import DTypeError, NonFiniteError, ShapeMismatchError
from . import select_torch
from .select_reference import alpha_tensor, normalized, select_threshold


def _describe(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


def check_pair(t1: torch.Tensor, t2: torch.Tensor, name: str | None = None) -> None:
    """Raise if t1 (model 1, the base) and t2 (model 2) cannot be merged."""
    what = _describe(name)
    for label, t in (("model 1 (base)", t1), ("model 2 (other)", t2)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{what}: {label} is a {type(t).__name__}, expected a torch.Tensor")
        if t.dtype not in FLOAT_DTYPES:
            kind = "float8 is not supported" if t.is_floating_point() else "not floating point"
            raise DTypeError(f"{what}: {label} has dtype {t.dtype} ({kind}), expected one of "
                             "bfloat16, float16, float32, float64")
    if t1.shape != t2.shape:
        raise ShapeMismatchError(f"{what}: shapes differ: model 1 (base) has "
                                 f"{list(t1.shape)}, model 2 (other) has {list(t2.shape)}")
    if t1.device != t2.device:
        raise ShapeMismatchError(f"{what}: devices differ: model 1 (base) is on {t1.device}, "
                                 f"model 2 (other) on {t2.device}")


@dataclass
class SelectResult:
    """What one select did: the number of elements of t2 it took."""

    taken: int
    numel: int


class _TorchEngine:
    minmax = staticmethod(select_torch.minmax)
    patch = staticmethod(select_torch.patch_selected)


def _engine(backend: str):
    return _TorchEngine if backend == "torch" else kernel_module("mod_select")


def select_into(dst: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, alpha: float,
                *, precision: str, backend: str, name: str | None = None) -> SelectResult:
    """Write the select of (t1, t2) into `dst` (contiguous, t1's dtype and size; may be t1
    itself for an in-place merge). Validates everything before writing into t1."""
    engine = _engine(backend)
    flat = dst.view(-1)
    inplace = dst.data_ptr() == t1.data_ptr() and dst.numel() > 0
    src = None if inplace else t1.contiguous().view(-1)
    if backend == "triton" and not t2.is_contiguous():
        t2 = t2.contiguous()  # the kernel reads t2 flat
    if flat.numel() == 0:
        return SelectResult(0, 0)
    mins, maxs = engine.minmax(flat if inplace else src, copy_to=None if inplace else flat)
    mn, mx = mins.min(), maxs.max()
    if not bool(torch.isfinite(mn) & torch.isfinite(mx)):
        bad = int(torch.nonzero(~torch.isfinite(t1.reshape(-1)))[0])
        raise NonFiniteError(f"{_describe(name)}: model 1 (base) has a non-finite value "
                             f"{t1.reshape(-1)[bad].item()} at flat index {bad}; expected "
                             "finite weights")
    if backend == "torch" and flat.numel() <= select_torch.DIRECT_MAX:
        keep = normalized(flat, mn, mx, precision) < alpha_tensor(alpha, flat.dtype, precision)
        take = torch.nonzero(~keep).flatten()
        taken, bad = select_torch.patch_indices(flat, t2, take)  # checks before writing
    else:
        v = select_threshold(mn, mx, alpha, precision)
        taken, bad = engine.patch(flat, t2, v, maxs, atomic=inplace)
    _raise_if_bad_t2(bad, t2, name)
    return SelectResult(taken, flat.numel())


def _raise_if_bad_t2(bad: int, t2: torch.Tensor, name: str | None) -> None:
    """NonFiniteError for t2's element at flat index `bad` (nothing when bad < 0)."""
    if bad >= 0:
        value = select_torch.gather_flat(t2, torch.tensor([bad], device=t2.device)).item()
        raise NonFiniteError(f"{_describe(name)}: model 2 (other) has a non-finite value "
                             f"{value} at flat index {bad}, where the merge takes model 2's "
                             "weight; expected finite weights")


def mod_select(t1: torch.Tensor, t2: torch.Tensor, alpha: float, *, backend: str = "auto",
               precision: str = "exact", out: torch.Tensor | None = None,
               name: str | None = None) -> torch.Tensor:
    """MoD select of one tensor pair (DESIGN.md 1.1): t1's element where its min-max
    normalized value is below alpha, t2's element elsewhere.

    Args:
        t1: the base model's tensor (floating point, finite).
        t2: the other model's tensor, same shape and device; only the elements that are
            taken are read (and must be finite).
        alpha: threshold in [0, 1]. 1 keeps t1 except at its maximum; 0 takes all of t2.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch" or "triton".
        precision: "exact" (float32 formula) or "reference" (the released code's arithmetic
            in t1's own dtype, bit for bit).
        out: optional tensor of t1's shape and dtype to write into.
        name: the tensor's key, used in error messages.

    Returns a tensor of t1's dtype and shape; t1 and t2 are not modified.
    """
    alpha, precision = check_alpha(alpha), check_precision(precision)
    check_pair(t1, t2, name)
    backend = resolve_backend(backend, t1, t2)
    if out is not None:
        if out.shape != t1.shape or out.dtype != t1.dtype or out.device != t1.device:
            raise ShapeMismatchError(f"{_describe(name)}: out must have t1's shape, dtype and "
                                     f"device ({list(t1.shape)}, {t1.dtype}, {t1.device}), got "
                                     f"({list(out.shape)}, {out.dtype}, {out.device})")
        if out.data_ptr() == t1.data_ptr() and out.numel() > 0:
            return mod_select_(t1, t2, alpha, backend=backend, precision=precision, name=name)
    usable = out is not None and out.is_contiguous() and out.data_ptr() != t2.data_ptr()
    dst = out if usable else torch.empty(t1.shape, dtype=t1.dtype, device=t1.device)
    select_into(dst, t1, t2, alpha, precision=precision, backend=backend, name=name)
    if out is not None and dst is not out:
        out.copy_(dst)
        return out
    return dst


def mod_select_(t1: torch.Tensor, t2: torch.Tensor, alpha: float, *, backend: str = "auto",
                precision: str = "exact", name: str | None = None) -> torch.Tensor:
    """In-place MoD select: overwrite t1's elements that take t2's value, and return t1.

    The cheapest merge: one read of t1 plus the few blocks that hold selected elements.
    Everything is validated before t1 is touched, so on error t1 is unchanged.
    Same arguments as `mod_select`."""
    alpha, precision = check_alpha(alpha), check_precision(precision)
    check_pair(t1, t2, name)
    select_inplace(t1, t2, alpha, precision=precision,
                   backend=resolve_backend(backend, t1, t2), name=name)
    return t1


def select_inplace(t1: torch.Tensor, t2: torch.Tensor, alpha: float, *, precision: str,
                   backend: str, name: str | None = None) -> SelectResult:
    """`select_into` t1 itself; a strided t1 is merged in a contiguous copy, then copied
    back (only after every check passed)."""
    if t1.is_contiguous():
        return select_into(t1, t1, t2, alpha, precision=precision, backend=backend, name=name)
    work = t1.contiguous()
    result = select_into(work, work, t2, alpha, precision=precision, backend=backend,
                         name=name)
    t1.copy_(work)
    return result


def select_many_into(outs: list[torch.Tensor], t1s: list[torch.Tensor],
                     t2s: list[torch.Tensor], alphas: list[float], *, precision: str,
                     names: list[str]) -> list[SelectResult]:
    """The select of many small tensor pairs of one dtype and device, on the Triton
    backend, in two kernel launches: the tensors are packed end to end and a block table
    tells each program which tensor it works on. Results go to `outs` (which may be the
    t1s themselves, for an in-place merge: they are written only after every check
    passed). Pairs must have been checked with `check_pair`."""
    ks = kernel_module("mod_select")
    dtype, device = t1s[0].dtype, t1s[0].device
    sizes = [t.numel() for t in t1s]
    table = ks.BlockTable(sizes, device)
    src = torch.cat([t.reshape(-1) for t in t1s])
    other = torch.cat([t.reshape(-1).to(dtype) for t in t2s])
    packed = torch.empty_like(src)
    bmin, bmax = ks.minmax(src, copy_to=packed, table=table)
    finite = torch.isfinite(bmin) & torch.isfinite(bmax)
    if not bool(finite.all()):
        k = int(table.seg[~finite][0])
        select_into(torch.empty_like(t1s[k]), t1s[k], t2s[k], alphas[k], precision=precision,
                    backend="torch", name=names[k])  # raises, naming the value and index
    inf = torch.full((len(sizes),), float("inf"), dtype=dtype, device=device)
    mn = inf.scatter_reduce(0, table.seg, bmin, "amin")
    mx = (-inf).scatter_reduce(0, table.seg, bmax, "amax")
    alpha = torch.tensor(alphas, dtype=torch.float64, device=device)
    v = select_threshold(mn, mx, alpha, precision)
    taken, bad = ks.patch(packed, other, v, bmax, table=table)
    if bad >= 0:
        k = bisect.bisect_right(table.offsets, bad) - 1
        _raise_if_bad_t2(bad - table.offsets[k], t2s[k], names[k])
    pieces = [p.view(t.shape) for p, t in zip(packed.split(sizes), t1s)]
    torch._foreach_copy_(outs, pieces)  # one fused launch on CUDA
    return [SelectResult(n_taken, size) for n_taken, size in zip(taken, sizes)]
