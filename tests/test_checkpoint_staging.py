"""Host<->device staging of the checkpoint merge (checkpoint/staging.py) and the read-ahead
ring it rides on (checkpoint/prefetch.py): on the CPU the same loop copies nothing; the
copy to a device is started by the thread that read the tensor; results come back into
the buffer the tensor was read into. The CUDA case runs where a GPU is."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

from modkern.checkpoint.folder import Checkpoint
from modkern.checkpoint.merge import merge_checkpoints
from modkern.checkpoint.options import MergeOptions
from modkern.checkpoint.prefetch import RING, prefetched
from modkern.checkpoint.job import open_merge
from modkern.checkpoint.report import MergeReport
from modkern.checkpoint.staging import Staged, Staging


@pytest.fixture
def folders(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (300, 70), "b.norm": (70,), "c": (129, 64), "d": (5000,), "e": (64, 64)}
    for name in ("base", "other"):
        (tmp_path / name).mkdir()
        sd = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
              for k, s in shapes.items()}
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    return tmp_path / "base", tmp_path / "other", shapes


def test_cpu_staging_copies_nothing():
    staging = Staging("cpu")
    assert not staging.pinned and staging.copy_stream is None
    t1 = torch.randn(6, 7)
    staged = staging.stage(t1)
    flat = staging.on_device(staged)
    assert staged.ready is None and flat.data_ptr() == t1.data_ptr() and flat.shape == (42,)
    assert staging.to_host(flat, t1) is t1
    other = torch.arange(42.0)
    assert staging.to_host(other, t1) is t1 and torch.equal(t1.view(-1), other)
    with staging.current_device():  # nothing to switch on the CPU
        pass


def test_prefetch_runs_then_on_the_reading_thread_and_reuses_its_ring(folders):
    base, _, shapes = folders
    seen = []

    def then(name, tensor):
        seen.append((name, threading.current_thread().name))
        return name, tensor.clone(), tensor.data_ptr()

    with Checkpoint(base, "BASE") as ck:
        items = list(prefetched(ck, then=then))
        expected = {n: ck.where[n].read_tensor(n) for n in ck.names()}
    assert [n for n, _ in items] == list(expected) and [n for n, _ in seen] == list(expected)
    assert all(thread.startswith("modkern-read") for _, thread in seen)
    for name, (same, copy, _) in items:
        assert same == name and torch.equal(copy, expected[name])
    assert len({ptr for _, (_, _, ptr) in items}) == RING  # one buffer per ring slot


def test_base_tensors_stages_only_what_is_merged(folders):
    base, other, shapes = folders
    options = MergeOptions(0.5, include=["a", "c"], progress=False)
    with open_merge(base, other, base.parent / "out", options) as job:
        report = MergeReport(out=job.out)
        kinds = {}
        for name, t1 in job.base_tensors():
            kinds[name] = type(t1)
            out = job.merge_one(name, t1, report)
            assert out.shape == shapes[name]
    assert kinds == {"a": Staged, "b.norm": torch.Tensor, "c": Staged, "d": torch.Tensor,
                     "e": torch.Tensor}
    assert report.tensors_merged == 2 and report.tensors_copied == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_staging_round_trip(folders):
    last = torch.cuda.device_count() - 1
    with Staging(f"cuda:{last}").current_device():
        assert torch.cuda.current_device() == last
    staging = Staging("cuda")
    assert staging.pinned
    host = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True).view(torch.bfloat16)
    host.copy_(torch.randn(host.numel()).to(torch.bfloat16))
    expected = host.clone()
    staged = staging.stage(host)
    flat = staging.on_device(staged)
    assert flat.is_cuda and staged.ready is not None
    flat.neg_()  # work on the compute stream, after the copy
    assert staging.to_host(flat, host) is host
    assert torch.equal(host, -expected)
    base, other, _ = folders
    for device in ("cpu", "cuda"):
        merge_checkpoints(base, other, base.parent / device, 0.3, device=device,
                          progress=False)
    assert (base.parent / "cpu" / "model.safetensors").read_bytes() == \
        (base.parent / "cuda" / "model.safetensors").read_bytes()
