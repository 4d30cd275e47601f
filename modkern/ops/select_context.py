"""The one set of error messages of the weight select, built from a `SelectContext` that
names what is being merged: a tensor of two in-memory models ("model 1 (base)", "model 2
(other)"), or a tensor of two checkpoint files ("BASE file", "OTHER file"), possibly a row
block of it that starts at flat index `first` (messages give flat indices of the whole
tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..checks import FLOAT_DTYPES
from ..errors import DTypeError, NonFiniteError, ShapeMismatchError
from .tensor_memory import overlaps_itself

MODELS = ("model 1 (base)", "model 2 (other)")
CHECKPOINTS = ("BASE", "OTHER")
BASE, OTHER = 0, 1  # which model a message is about


@dataclass(frozen=True)
class SelectContext:
    """Names for messages: the tensor's key (None: unnamed), the BASE and OTHER files it
    was read from (None: tensors in memory), and the flat index of the first element of
    the part being merged (a row block of a split tensor)."""

    name: str | None = None
    files: tuple[Path, Path] | None = None
    first: int = 0

    def block(self, first: int) -> "SelectContext":
        """The same tensor, for the part that starts at flat index `first`."""
        return replace(self, first=first)

    @property
    def tensor(self) -> str:
        return f"tensor {self.name!r}" if self.name else "tensor"

    @property
    def pair(self) -> str:
        """What a message about the pair is about: "tensor 'k'", after the two files when
        they are checkpoint files."""
        if self.files is None:
            return self.tensor
        return f"BASE {self.files[0]} vs OTHER {self.files[1]}: {self.tensor}"

    def at(self, which: int) -> str:
        """What a message about one model's values is about."""
        if self.files is None:
            return f"{self.tensor}: {MODELS[which]}"
        return f"{CHECKPOINTS[which]} {self.files[which]}: {self.tensor}"

    def in_files(self, message: str) -> str:
        """`message` (about this tensor) prefixed with the files, when there are files."""
        if self.files is None:
            return message
        return f"BASE {self.files[0]} vs OTHER {self.files[1]}: {message}"

    # --- the messages -------------------------------------------------------------------

    def check_pair(self, t1: torch.Tensor, t2: torch.Tensor, *, need_data: bool = True,
                   vocab: str = "strict") -> None:
        """Raise if t1 (model 1, the base) and t2 (model 2) cannot be merged. `need_data`:
        False for the meta tensors that stand for a checkpoint's headers. `vocab="common"`
        lets the first dimension differ (the vocabulary's padded rows)."""
        for label, t in zip(MODELS, (t1, t2)):
            self.check_tensor(t, label, need_data)
        if t1.device != t2.device:
            raise ShapeMismatchError(f"{self.pair}: devices differ: {MODELS[0]} is on "
                                     f"{t1.device}, {MODELS[1]} on {t2.device}; expected "
                                     "both on one device")
        if t1.shape == t2.shape:
            return
        rows_only = t1.dim() == t2.dim() >= 1 and t1.shape[1:] == t2.shape[1:]
        if rows_only and vocab == "common":
            return
        hint = (" (if only the vocabulary's padded rows differ, pass vocab=\"common\" / "
                "--vocab common to merge the common rows and keep model 1's extra rows)"
                if rows_only else "")
        raise ShapeMismatchError(f"{self.pair}: shapes differ: {MODELS[0]} has "
                                 f"{list(t1.shape)}, {MODELS[1]} has {list(t2.shape)}; "
                                 f"expected one shape{hint}")

    def check_tensor(self, t, label: str, need_data: bool = True) -> None:
        """Raise DTypeError unless `t` (model `label`'s) is a dense floating-point tensor of
        a dtype the select computes in, with data (not meta) when `need_data`."""
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{self.pair}: {label} is a {type(t).__name__}, expected a "
                             "torch.Tensor")
        kind = dense_kind(t)
        if kind is not None:
            raise DTypeError(f"{self.pair}: {label} is {kind}; expected a dense (strided) "
                             "floating-point tensor (call .to_dense() first)")
        if t.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"{self.pair}: {label} has dtype {t.dtype} ({dtype_kind(t)}), "
                             "expected one of bfloat16, float16, float32, float64")
        if need_data and t.is_meta:
            raise DTypeError(f"{self.pair}: {label} is a meta tensor (a shape without data); "
                             "expected a tensor with data on the CPU or a GPU (load the "
                             "weights first)")

    def check_writable(self, t: torch.Tensor, what: str = MODELS[0]) -> None:
        """Raise unless every element of `t` (written: t1 in place, or `out`) has its own
        memory."""
        fix = "merge out of place, or pass .clone()" if what == MODELS[0] else \
            "e.g. torch.empty_like(t1)"
        if overlaps_itself(t):
            raise DTypeError(f"{self.pair}: {what} is written but its elements share memory "
                             f"(shape {list(t.shape)}, strides {list(t.stride())}: an "
                             "expanded or stride-0 view); expected a tensor whose elements "
                             f"each have their own memory ({fix})")

    def floating_mismatch(self, t1: torch.Tensor, t2: torch.Tensor) -> DTypeError:
        """One model's tensor is floating point, the other's is not."""
        return DTypeError(f"{self.pair}: {MODELS[0]} has dtype {t1.dtype} but {MODELS[1]} has "
                          f"{t2.dtype}; expected both floating point or both not")

    def check_out(self, t1: torch.Tensor, out) -> None:
        """Raise unless `out` can hold the select of t1: a dense tensor of t1's shape,
        dtype and device whose elements each have their own memory."""
        if not isinstance(out, torch.Tensor) or dense_kind(out) is not None or \
                out.shape != t1.shape or out.dtype != t1.dtype or out.device != t1.device:
            got = (type(out).__name__ if not isinstance(out, torch.Tensor) else
                   dense_kind(out) or f"({list(out.shape)}, {out.dtype}, {out.device})")
            raise ShapeMismatchError(f"{self.pair}: out must be a dense tensor of t1's shape, "
                                     f"dtype and device ({list(t1.shape)}, {t1.dtype}, "
                                     f"{t1.device}), got {got}")
        self.check_writable(out, "out")

    def nonfinite_base(self, flat: torch.Tensor) -> NonFiniteError:
        """`flat` holds model 1's elements of this part, one of them not finite."""
        bad = int(torch.nonzero(~torch.isfinite(flat))[0])
        return NonFiniteError(f"{self.at(BASE)} has a non-finite value {flat[bad].item()} at "
                              f"flat index {bad + self.first}; expected finite weights")

    def nonfinite_other(self, value: torch.Tensor, index: int, dtype: torch.dtype
                        ) -> NonFiniteError:
        """Model 2's element at flat index `index` of this part is `value` (as stored),
        which is not finite in the output `dtype`."""
        shown = f"{value.item()}"
        if bool(torch.isfinite(value)):  # finite as stored, but beyond the output's range
            shown += f" (beyond the range of {str(dtype).removeprefix('torch.')})"
        whose = f"{CHECKPOINTS[OTHER]}'s" if self.files is not None else "model 2's"
        return NonFiniteError(f"{self.at(OTHER)} has a non-finite value {shown} at flat index "
                              f"{index + self.first}, where the merge takes {whose} weight; "
                              "expected finite weights")


def dense_kind(t: torch.Tensor) -> str | None:
    """What t is when it is not a dense strided tensor ("a sparse tensor (layout ...)", "a
    nested tensor"), else None."""
    if t.is_nested:
        return "a nested tensor"
    if t.layout != torch.strided:
        kind = "a sparse tensor" if t.is_sparse or "sparse" in str(t.layout) else \
            "an opaque tensor"
        return f"{kind} (layout {t.layout})"
    return None


def dtype_kind(t: torch.Tensor) -> str:
    """Why t's dtype is not one the select computes in."""
    if t.is_quantized:
        return "quantized: call .dequantize() first"
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "float8 is not supported"
    return "not floating point"
