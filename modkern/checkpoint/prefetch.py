"""Reading BASE's tensors ahead of the merge: the next tensor is read by a background
thread while the current one is merged and written."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .folder import Checkpoint

# Buffers BASE's tensors are read into: one being read, one merged, one written.
RING = 3


def prefetched(ck: Checkpoint, names: list[str] | None = None, *, pinned: bool = False,
               then: Callable[[str, torch.Tensor], Any] | None = None
               ) -> Iterator[tuple[str, Any]]:
    """BASE's tensors (all, or `names`) in file order, each read by a background thread
    while the one before is merged and written (positioned reads release the GIL).

    Tensors live in a ring of RING byte buffers sized to the largest tensor (`pinned`:
    page-locked, for fast copies to a GPU), reused rather than allocated per tensor (fresh
    memory costs a page fault per 4 KB). A yielded tensor is valid until RING - 1 more have
    been yielded: one is being read, one merged, one written (BackgroundWriter keeps at
    most one write in flight). `then(name, tensor)`, when given, runs on the reading thread
    after each read (e.g. to start the tensor's copy to a GPU) and what it returns is
    yielded in the tensor's place."""
    names = ck.names() if names is None else names
    largest = max((ck.info(n).nbytes for n in names), default=0)
    ring = [torch.empty(largest, dtype=torch.uint8, pin_memory=pinned)
            for _ in range(min(RING, len(names)))]

    def target(i: int) -> torch.Tensor:
        info = ck.info(names[i])
        return ring[i % len(ring)][:info.nbytes].view(info.dtype).view(info.shape)

    def read(i: int):
        tensor = ck.where[names[i]].read_tensor(names[i], target(i))
        return tensor if then is None else then(names[i], tensor)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="modkern-read") as pool:
        def submit(i: int):
            return pool.submit(read, i) if i < len(names) else None

        pending = submit(0)
        for i, name in enumerate(names):
            item = pending.result()
            pending = submit(i + 1)
            yield name, item
            del item
