"""Moving BASE's tensors to the merge's device and the merged tensors back, overlapped with
the work on the device.

On a CUDA device BASE's tensors are read into pinned (page-locked) host buffers (the
prefetch ring), so that a copy to the GPU is a DMA that runs beside the kernels. The
thread that read tensor i+1 starts its copy on a copy stream at once, while tensor i is
merged on the compute stream, which waits for the copy only when it needs the data
(an event). The merged tensor comes back into the very buffer it was read from: the ring
already keeps that buffer until the writer has written it (one buffer being read, one
merged, one written: the double buffering comes with the ring).

On the CPU the same calls copy nothing: a tensor is merged in the buffer it was read into.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch


@dataclass
class Staged:
    """One of BASE's tensors: `host`, the CPU tensor read from the file, and `device`, its
    flat copy on the merge's device (a view of host on the CPU), valid once the event
    `ready` has completed (None: at once)."""

    host: torch.Tensor
    device: torch.Tensor
    ready: object | None = None


class Staging:
    """Host<->device copies of one merge (see the module docstring)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def current_device(self) -> AbstractContextManager:
        """A context in which the merge's GPU is the current CUDA device (Triton launches
        on the current device, whatever device its tensors are on); nothing on the CPU."""
        return torch.cuda.device(self.device) if self.cuda else nullcontext()

    @property
    def pinned(self) -> bool:
        """Whether host buffers for this device should be pinned (CUDA only)."""
        return self.cuda

    def stage(self, t1: torch.Tensor) -> Staged:
        """Start copying the contiguous CPU tensor t1 to the device (on the copy stream;
        any thread may call this)."""
        if not self.cuda:
            return Staged(t1, t1.view(-1))
        with torch.cuda.stream(self.copy_stream):
            device = t1.view(-1).to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return Staged(t1, device, ready)

    def on_device(self, staged: Staged) -> torch.Tensor:
        """The device copy, for work on the current stream (which waits for the copy; the
        caching allocator is told the tensor is used there)."""
        if staged.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(staged.ready)
            staged.device.record_stream(stream)
        return staged.device

    def to_host(self, flat: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        """`flat` (the merged tensor on the device) copied into the CPU tensor `host` of the
        same number of elements, which is returned once the copy is complete. On the CPU
        `flat` usually is host's memory already: then nothing is copied."""
        if flat.device.type == "cpu" and flat.data_ptr() == host.data_ptr():
            return host
        host.view(-1).copy_(flat, non_blocking=self.cuda and host.is_pinned())
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return host
