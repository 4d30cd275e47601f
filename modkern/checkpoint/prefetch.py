"""Reading BASE's tensors ahead of the merge: the next tensor is read by a background
thread while the current one is merged and written."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .folder import Checkpoint

# Buffers BASE's tensors are read into: one being read, one merged, one written.
RING = 3


def prefetched(ck: Checkpoint, names: list[str] | None = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """BASE's tensors (all, or `names`) in file order, each read by a background thread
    while the one before is merged and written (positioned reads release the GIL).

    Tensors live in a ring of RING byte buffers sized to the largest tensor, reused
    rather than allocated per tensor (fresh memory costs a page fault per 4 KB). A yielded
    tensor is valid until RING - 1 more have been yielded: one is being read, one merged,
    one written (BackgroundWriter keeps at most one write in flight)."""
    names = ck.names() if names is None else names
    largest = max((ck.info(n).nbytes for n in names), default=0)
    ring = [torch.empty(largest, dtype=torch.uint8) for _ in range(min(RING, len(names)))]

    def target(i: int) -> torch.Tensor:
        info = ck.info(names[i])
        return ring[i % len(ring)][:info.nbytes].view(info.dtype).view(info.shape)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="modkern-read") as pool:
        def read(i: int):
            if i >= len(names):
                return None
            return pool.submit(ck.where[names[i]].read_tensor, names[i], target(i))

        pending = read(0)
        for i, name in enumerate(names):
            tensor = pending.result()
            pending = read(i + 1)
            yield name, tensor
            del tensor
