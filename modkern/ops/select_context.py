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

    def check_pair(self, t1: torch.Tensor, t2: torch.Tensor) -> None:
        """Raise if t1 (model 1, the base) and t2 (model 2) cannot be merged."""
        for label, t in zip(MODELS, (t1, t2)):
            if not isinstance(t, torch.Tensor):
                raise DTypeError(f"{self.pair}: {label} is a {type(t).__name__}, expected a "
                                 "torch.Tensor")
            if t.dtype not in FLOAT_DTYPES:
                kind = "float8 is not supported" if t.is_floating_point() else \
                    "not floating point"
                raise DTypeError(f"{self.pair}: {label} has dtype {t.dtype} ({kind}), "
                                 "expected one of bfloat16, float16, float32, float64")
        if t1.shape != t2.shape:
            raise ShapeMismatchError(f"{self.pair}: shapes differ: {MODELS[0]} has "
                                     f"{list(t1.shape)}, {MODELS[1]} has {list(t2.shape)}")
        if t1.device != t2.device:
            raise ShapeMismatchError(f"{self.pair}: devices differ: {MODELS[0]} is on "
                                     f"{t1.device}, {MODELS[1]} on {t2.device}")

    def floating_mismatch(self, t1: torch.Tensor, t2: torch.Tensor) -> DTypeError:
        """One model's tensor is floating point, the other's is not."""
        return DTypeError(f"{self.pair}: {MODELS[0]} has dtype {t1.dtype} but {MODELS[1]} has "
                          f"{t2.dtype}; expected both floating point or both not")

    def bad_out(self, t1: torch.Tensor, out: torch.Tensor) -> ShapeMismatchError:
        return ShapeMismatchError(f"{self.pair}: out must have t1's shape, dtype and device "
                                  f"({list(t1.shape)}, {t1.dtype}, {t1.device}), got "
                                  f"({list(out.shape)}, {out.dtype}, {out.device})")

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
