"""What a checkpoint merge did: `MergeReport`, and byte counts for people."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path



@dataclass
class MergeReport:
    """What `merge_checkpoints` did. Byte counts are what was asked of each input's weight
    files (headers included); bytes_base/bytes_other are those files' sizes."""

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
