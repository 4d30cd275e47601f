"""What a checkpoint merge did: `MergeReport`, and byte counts for people."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..merging.counts import Counting
from .hooks import MergeHooks


@dataclass
class MergeReport(Counting):
    """What `merge_checkpoints` did. Byte counts are what was asked of each input's weight
    files (headers included); bytes_base/bytes_other are those files' sizes. Counted with
    the counter of merge_state_dicts' MergeStats (merging/counts.py)."""

    CARRIED = "tensors_copied"
    SUMMED = (*Counting.SUMMED, "bytes_read_base", "bytes_read_other", "bytes_written")

    out: Path
    tensors_merged: int = 0
    tensors_copied: int = 0
    elements_merged: int = 0
    elements_taken: int = 0
    bytes_read_base: int = 0
    bytes_read_other: int = 0
    bytes_base: int = 0
    bytes_other: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    taken_by_key: dict[str, int] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        """One line: tensors, elements taken from OTHER, bytes read per input, time."""
        def frac(a: int, b: int) -> str:
            return f"{a / b:.1%}" if b else "-"
        taken = (f"{self.elements_taken / self.elements_merged:.1e}"
                 if self.elements_merged else "-")
        return (f"merged {self.tensors_merged} tensors ({self.tensors_copied} copied); took "
                f"{self.elements_taken:,} of {self.elements_merged:,} elements from OTHER "
                f"({taken}); read {format_bytes(self.bytes_read_base)} of BASE "
                f"({frac(self.bytes_read_base, self.bytes_base)}) and "
                f"{format_bytes(self.bytes_read_other)} of OTHER "
                f"({frac(self.bytes_read_other, self.bytes_other)}); wrote "
                f"{format_bytes(self.bytes_written)} to {self.out} in {self.seconds:.1f} s")


def format_bytes(n: int) -> str:
    """n bytes for people: "512 B", "1.50 MB" (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


class Progress:
    """A merge's progress, one `tick` per tensor (or part of one) written: advances the
    progress bar over the bytes written, if one is shown (`show` True, or None and stderr
    is a terminal), and calls the hooks."""

    def __init__(self, show: bool | None, total_bytes: int, tensors: int, hooks: MergeHooks,
                 rank: int = 0, desc: str = "modkern merge"):
        self.done, self.tensors, self.hooks, self.rank = 0, tensors, hooks, rank
        self.bar = None
        if show or (show is None and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                            desc=desc, file=sys.stderr, dynamic_ncols=True,
                            postfix=f"0/{tensors} tensors")

    def tick(self, bytes_written: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.done}/{self.tensors} tensors", refresh=False)
            self.bar.update(bytes_written - self.bar.n)
        self.hooks.after_tensor(self.rank, self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
