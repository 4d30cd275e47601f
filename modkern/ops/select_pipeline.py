"""The weight select, step by step, for every caller: `mod_select`/`mod_select_`,
`merge_state_dicts` (also many small tensors packed together), the checkpoint merge and
each rank of the distributed merge (a row block, its min and max reduced over the ranks).

1. min/max of t1 (and, out of place, the copy of t1 into the output): the engine's minmax;
2. t1 must be finite (a NaN or an infinity shows in the min or max);
3. the exact threshold v (select_reference.select_threshold), so `norm(x) < alpha <=> x < v`;
4. what to take: the elements >= v (small tensors on the torch engine: the formula itself);
5. model 2's values there: from a tensor in the engine's fused patch (a kernel), or group
   by group of hot blocks (a file on every engine, a tensor on the torch engine): a group
   that takes many elements read whole and patched by masks, the others read only at
   their selected indices (`take_by_groups`);
6. they must be finite in t1's dtype;
7. the write into the output.

The engine (select_engine.py) runs the passes; the source (select_source.py) gives model
2's values; the context (select_context.py) names the tensor, model and file in errors.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .select_context import SelectContext
from .select_engine import PackedEngine, SelectEngine
from .select_reference import alpha_tensor, normalized, select_threshold
from .select_torch import at_least, nonfinite
from .select_source import TensorSource, ValueSource, check_at, take_at
from .tensor_memory import shares_memory, view_key


@dataclass
class SelectResult:
    """What one select did: the number of elements of t2 it took, of `numel`."""

    taken: int
    numel: int


class FlatSelect:
    """The select of one contiguous 1-D part (a whole tensor, or a row block of one),
    in two calls so that a distributed rank can reduce the min and max over all ranks
    between them: `bounds()` (steps 1-2), then `apply(mn, mx, ...)` (steps 3-7).

    dst: where the result goes; holds t1 after `bounds` (it is t1 itself in place).
    src: t1, contiguous 1-D, when out of place (copied into dst by the min/max pass)."""

    def __init__(self, dst: torch.Tensor, engine: SelectEngine, context: SelectContext,
                 src: torch.Tensor | None = None):
        self.dst, self.src, self.engine, self.context = dst, src, engine, context
        self.block_max: torch.Tensor | None = None

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-2: t1's (min, max) as 0-dim tensors of its dtype; NonFiniteError naming
        the first non-finite element. An empty part has none: (inf, -inf)."""
        t1 = self.dst if self.src is None else self.src
        if t1.numel() == 0:
            inf = torch.tensor(float("inf"), dtype=t1.dtype, device=t1.device)
            return inf, -inf
        mins, self.block_max = self.engine.minmax(t1, copy_to=None if self.src is None
                                                  else self.dst)
        mn, mx = mins.min(), self.block_max.max()
        if not bool(torch.isfinite(mn) & torch.isfinite(mx)):
            raise self.context.nonfinite_base(t1.cpu())
        return mn, mx

    def apply(self, mn: torch.Tensor, mx: torch.Tensor, alpha: float, precision: str,
              source: ValueSource, atomic: bool = False) -> SelectResult:
        """Steps 3-7 with the min and max of the whole tensor. `atomic`: on a non-finite
        value of model 2 nothing is written (in-place merges into the caller's tensor)."""
        flat = self.dst
        if flat.numel() == 0:
            return SelectResult(0, 0)
        # by groups of hot blocks, except where the engine's patch reads a tensor in its own
        # pass; a file goes by groups on every engine (so every engine reads it alike)
        if flat.numel() <= self.engine.direct_max and source.tensor is not None:
            taken, bad = take_at(flat, source, [direct_taken(flat, mn, mx, alpha, precision)])
        else:
            v = select_threshold(mn, mx, alpha, precision).to(flat.device)
            if source.tensor is not None and self.engine.fused_patch:
                taken, bad = self.engine.patch(flat, source.tensor, v, self.block_max,
                                               atomic=atomic)
            else:
                taken, bad = take_by_groups(flat, source, self.engine, v, self.block_max,
                                            atomic)
        if bad >= 0:
            raise self.context.nonfinite_other(value_at(source, bad), bad, flat.dtype)
        return SelectResult(taken, flat.numel())

    def check(self, mn: torch.Tensor, mx: torch.Tensor, alpha: float, precision: str,
              source: ValueSource) -> None:
        """Steps 3-6 without the write: raise what `apply` would raise (a value of model 2
        that is not finite where it is taken) and write nothing. The first phase of an
        in-place merge of many tensors, which writes none of them until all are checked."""
        flat = self.dst
        if flat.numel() == 0:
            return
        if flat.numel() <= self.engine.direct_max:
            bad = check_at(flat, source, [direct_taken(flat, mn, mx, alpha, precision)])
        else:
            v = select_threshold(mn, mx, alpha, precision).to(flat.device)
            bad = first_bad_by_groups(flat, source, self.engine, v, self.block_max)
        if bad >= 0:
            raise self.context.nonfinite_other(value_at(source, bad), bad, flat.dtype)


def direct_taken(flat: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, alpha: float,
                 precision: str) -> torch.Tensor:
    """The flat indices of the elements to take, from the formula itself (small parts)."""
    keep = normalized(flat, mn, mx, precision) < alpha_tensor(alpha, flat.dtype, precision,
                                                              flat.device)
    return torch.nonzero(~keep).flatten()


def take_by_groups(flat: torch.Tensor, source: ValueSource, engine: SelectEngine,
                   v: torch.Tensor, block_max: torch.Tensor, atomic: bool = False
                   ) -> tuple[int, int]:
    """Steps 4-7 one group of hot blocks at a time (bounded memory): a group that takes many
    of its range's elements (source.reads_range: at low alpha) has model 2's range read at
    once and patched by masks, without any index; the others are read at their indices
    (from a file: their pages). With `atomic`, every group is checked before any is
    written. Returns (taken, first non-finite index or -1)."""
    if atomic:
        bad = first_bad_by_groups(flat, source, engine, v, block_max)
        if bad >= 0:
            return 0, bad
    taken = 0
    for g in engine.groups(flat, v, block_max):
        if source.reads_range(g.count, g.stop - g.start):
            values = source.read_range(g.start, g.stop).to(flat.device)
            n, bad = engine.patch_range(flat[g.start:g.stop], values, v,
                                        block_max[g.first_block:g.end_block])
            bad = bad + g.start if bad >= 0 else -1
        else:
            n, bad = take_at(flat, source, [g.indices()])
        taken += n
        if bad >= 0:
            return taken, bad
    return taken, -1


def first_bad_by_groups(flat: torch.Tensor, source: ValueSource, engine: SelectEngine,
                        v: torch.Tensor, block_max: torch.Tensor) -> int:
    """The flat index of the first value of model 2 that is taken and not finite (in
    flat's dtype), or -1; nothing is written. Groups as in take_by_groups."""
    at_v = v.reshape(1).to(flat.dtype)
    for g in engine.groups(flat, v, block_max):
        if source.reads_range(g.count, g.stop - g.start):
            values = source.read_range(g.start, g.stop).to(device=flat.device,
                                                           dtype=flat.dtype)
            bad = at_least(flat[g.start:g.stop], at_v) & nonfinite(values)
            if bool(bad.any()):
                return g.start + int(bad.to(torch.uint8).argmax())
        else:
            bad_at = check_at(flat, source, [g.indices()])
            if bad_at >= 0:
                return bad_at
    return -1


def value_at(source: ValueSource, index: int) -> torch.Tensor:
    """Model 2's value (as stored) at one flat index of the part."""
    return source.read(torch.tensor([index]))[0]


def select_flat(dst: torch.Tensor, source: ValueSource, alpha: float, *, precision: str,
                engine: SelectEngine, context: SelectContext,
                src: torch.Tensor | None = None, atomic: bool = False) -> SelectResult:
    """The whole select of one contiguous 1-D part (see FlatSelect)."""
    part = FlatSelect(dst, engine, context, src)
    mn, mx = part.bounds()
    return part.apply(mn, mx, alpha, precision, source, atomic)


def select_into(dst: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, alpha: float, *,
                precision: str, engine: SelectEngine, context: SelectContext) -> SelectResult:
    """Write the select of the checked pair (t1, t2) into `dst` (contiguous, t1's dtype and
    size; may be t1 itself for an in-place merge). Validates everything before writing
    into t1."""
    inplace = dst.data_ptr() == t1.data_ptr() and dst.numel() > 0
    src = None if inplace else t1.contiguous().view(-1)
    return select_flat(dst.view(-1), TensorSource(t2), alpha, precision=precision,
                       engine=engine, context=context, src=src, atomic=inplace)


def check_select(t1: torch.Tensor, t2: torch.Tensor, alpha: float, *, precision: str,
                 engine: SelectEngine, context: SelectContext) -> None:
    """Raise what `select_into` would raise for the checked pair (t1 not finite, model 2 not
    finite where taken), writing nothing: t1's min/max pass and model 2's selected values
    (a strided t1 is read through a contiguous copy)."""
    part = FlatSelect(t1.contiguous().view(-1), engine, context)
    mn, mx = part.bounds()
    part.check(mn, mx, alpha, precision, TensorSource(t2))


def select_inplace(t1: torch.Tensor, t2: torch.Tensor, alpha: float, *, precision: str,
                   engine: SelectEngine, context: SelectContext) -> SelectResult:
    """`select_into` t1 itself; a strided t1 is merged in a contiguous copy, then copied
    back (only after every check passed). A t2 that shares memory with t1 (other than
    being t1 itself) is read from a copy taken before t1 is written."""
    if shares_memory(t1, t2) and view_key(t1) != view_key(t2):
        t2 = t2.clone()
    if t1.is_contiguous():
        return select_into(t1, t1, t2, alpha, precision=precision, engine=engine,
                           context=context)
    work = t1.contiguous()
    result = select_into(work, work, t2, alpha, precision=precision, engine=engine,
                         context=context)
    t1.copy_(work)
    return result


def select_packed(outs: list[torch.Tensor], t1s: list[torch.Tensor],
                  t2s: list[torch.Tensor], alphas: list[float], *, precision: str,
                  engine: PackedEngine, contexts: list[SelectContext]) -> list[SelectResult]:
    """The select of many small checked pairs of one dtype and device in two launches:
    the same steps, on the tensors packed end to end (a block table tells each program
    which tensor it works on). Results go to `outs` (which may be the t1s themselves, for
    an in-place merge: they are written only after every check passed)."""
    sizes = [t.numel() for t in t1s]
    table = engine.pack(sizes, t1s[0].device)
    src = torch.cat([t.reshape(-1) for t in t1s])
    packed = torch.empty_like(src)
    bmin, bmax = engine.minmax(src, copy_to=packed, table=table)  # steps 1-2
    finite = torch.isfinite(bmin) & torch.isfinite(bmax)
    if not bool(finite.all()):
        k = int(table.seg[~finite][0])
        raise contexts[k].nonfinite_base(t1s[k].reshape(-1).cpu())
    inf = torch.full((len(sizes),), float("inf"), dtype=src.dtype, device=src.device)
    mn = inf.scatter_reduce(0, table.seg, bmin, "amin")
    mx = (-inf).scatter_reduce(0, table.seg, bmax, "amax")
    alpha = torch.tensor(alphas, dtype=torch.float64, device=src.device)
    v = select_threshold(mn, mx, alpha, precision)  # step 3
    other = torch.cat([t.reshape(-1).to(src.dtype) for t in t2s])
    taken, bad = engine.patch(packed, other, v, bmax, table=table)  # steps 4-7
    if bad >= 0:
        k = bisect.bisect_right(table.offsets, bad) - 1
        index = bad - table.offsets[k]
        raise contexts[k].nonfinite_other(value_at(TensorSource(t2s[k]), index), index,
                                          src.dtype)
    pieces = [p.view(t.shape) for p, t in zip(packed.split(sizes), t1s)]
    torch._foreach_copy_(outs, pieces)  # one fused launch on CUDA
    return [SelectResult(n_taken, size) for n_taken, size in zip(taken, sizes)]
