"""New output tensors for large merge results, in memory that is cheap to fill.

A fresh tensor's pages are mapped by the kernel on first write, one 4 KB page fault at a
time: for a 136 MB bf16 weight, filling new memory costs several times writing into
memory already mapped (measured on a 2-vCPU EPYC VM: ~45 ms against ~10 ms). Large CPU
outputs are therefore put in their own anonymous mapping with transparent huge pages asked
for (madvise MADV_HUGEPAGE): 2 MB pages, 512x fewer faults (~14 ms for the same weight).

Not everywhere: a virtual machine whose balloon device has free page reporting hands every
free 2 MB block back to its host, and a huge page is exactly such a block, so each one
must first be faulted back in by the host (measured on such a VM: ~200 ms for the same
weight, 4x the small pages). There ("auto") outputs stay plain `torch.empty` tensors, as
where the kernel has transparent huge pages off or mmap lacks MADV_HUGEPAGE (not Linux).
The environment variable MODKERN_HUGE_PAGES overrides the choice: "auto" (the default),
"on"/"1" (huge pages wherever the kernel allows them), "off"/"0" (never).

Only outputs of at least HUGE_MIN_BYTES take that route: glibc serves smaller ones from
its heap, where a tensor freed and allocated again reuses pages already mapped. The
mapping is unmapped when the tensor's memory is freed. Such a tensor is like any other
except that its storage cannot grow (`resize_` to more elements raises, as for a tensor
made by `torch.from_numpy`).
"""

from __future__ import annotations

import math
import mmap
import os
from functools import cache
from pathlib import Path

import torch

from ..errors import OptionError

HUGE_PAGES_ENV = "MODKERN_HUGE_PAGES"
HUGE_PAGE = 2 << 20
# glibc's malloc serves allocations below its largest dynamic mmap threshold (32 MB on
# 64-bit) from the heap, and maps each larger one afresh: those gain from huge pages.
HUGE_MIN_BYTES = 32 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
VIRTIO_DEVICES = Path("/sys/bus/virtio/devices")
VIRTIO_BALLOON = "0x0005"  # virtio device id of a memory balloon
BALLOON_F_REPORTING = 5  # its feature bit: free page reporting


@cache
def thp_available() -> bool:
    """Whether this process can ask for transparent huge pages (Linux, THP set to
    "always" or "madvise")."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


@cache
def free_pages_reported(devices: Path = VIRTIO_DEVICES) -> bool:
    """Whether a virtio balloon reports free pages to the host (each device's `features`
    file holds one '0'/'1' character per feature bit)."""
    for device in devices.glob("*"):
        try:
            if (device / "device").read_text().strip() != VIRTIO_BALLOON:
                continue
            features = (device / "features").read_text().strip()
        except OSError:
            continue
        if len(features) > BALLOON_F_REPORTING and features[BALLOON_F_REPORTING] == "1":
            return True
    return False


def huge_pages_wanted() -> bool:
    """Whether large CPU outputs go in huge pages (see the module docstring)."""
    setting = os.environ.get(HUGE_PAGES_ENV, "").strip().lower() or "auto"
    if setting not in ("auto", "on", "1", "off", "0"):
        raise OptionError(f"{HUGE_PAGES_ENV}={setting!r}: expected auto, on (1) or off (0)")
    if setting in ("off", "0") or not thp_available():
        return False
    return setting != "auto" or not free_pages_reported()


def empty_output(shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
                 device: torch.device | str) -> torch.Tensor:
    """An uninitialized contiguous tensor for a result: in a mapping of transparent huge
    pages when it is on the CPU, large, and huge pages are wanted here (see the module
    docstring), else `torch.empty`."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < HUGE_MIN_BYTES \
            or not huge_pages_wanted():
        return torch.empty(shape, dtype=dtype, device=device)
    # A length of whole huge pages lets the kernel place the mapping on a 2 MB boundary.
    buffer = mmap.mmap(-1, -(-nbytes // HUGE_PAGE) * HUGE_PAGE,
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # refused (e.g. a kernel built without THP): small pages, still correct
        pass
    # the tensor holds the mapping; freeing the tensor's memory unmaps it
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)
