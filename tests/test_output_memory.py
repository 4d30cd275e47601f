"""Outputs in huge-page mappings (modkern/ops/output_memory.py): the tensors hold what is
written, have the asked dtype and shape, are unmapped when freed; the environment
variable is parsed strictly; the balloon check reads virtio feature bits."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

import modkern
from modkern.errors import OptionError
from modkern.ops import output_memory
from modkern.ops.output_memory import HUGE_MIN_BYTES, HUGE_PAGES_ENV, empty_output


def mapping_of(ptr: int) -> str | None:
    """The /proc/self/smaps entry of the mapping that starts at address ptr."""
    entry: list[str] = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and not line.endswith(":"):
            if entry:
                break
            if int(line.split("-", 1)[0], 16) == ptr:
                entry.append(line)
        elif entry:
            entry.append(line)
    return "\n".join(entry) or None


@pytest.mark.parametrize("setting", ["on", "1", "ON ", "off", "0", "auto", ""])
def test_large_output_is_a_plain_tensor(monkeypatch, setting):
    monkeypatch.setenv(HUGE_PAGES_ENV, setting)
    numel = HUGE_MIN_BYTES // 2 + 3  # bf16: just over the bound
    out = empty_output((numel // 3, 3), torch.bfloat16, "cpu")
    assert out.shape == (numel // 3, 3) and out.dtype == torch.bfloat16
    assert out.is_contiguous() and out.device.type == "cpu"
    values = torch.arange(out.numel(), dtype=torch.float32).to(torch.bfloat16)
    out.view(-1).copy_(values)
    assert torch.equal(out.view(-1), values)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_huge_mapping_when_on_and_unmapped_when_freed(monkeypatch):
    monkeypatch.setenv(HUGE_PAGES_ENV, "on")
    out = empty_output((HUGE_MIN_BYTES // 4,), torch.float32, "cpu")
    ptr = out.data_ptr()
    entry = mapping_of(ptr)
    if output_memory.thp_available():
        assert entry is not None and " hg" in entry  # VmFlags: madvise(MADV_HUGEPAGE)
        out.fill_(1.5)
        assert float(out.sum()) == 1.5 * out.numel()
        del out
        gc.collect()
        assert mapping_of(ptr) is None


@pytest.mark.parametrize("setting", ["off", "0"])
def test_off_gives_torch_empty(monkeypatch, setting):
    monkeypatch.setenv(HUGE_PAGES_ENV, setting)
    assert not output_memory.huge_pages_wanted()


def test_small_outputs_and_other_devices_take_torch_empty(monkeypatch):
    calls = []
    monkeypatch.setattr(output_memory.mmap, "mmap", lambda *a, **k: calls.append(a))
    monkeypatch.setenv(HUGE_PAGES_ENV, "on")
    out = empty_output((5, 7), torch.float64, torch.device("cpu"))
    assert out.shape == (5, 7) and out.dtype == torch.float64 and not calls
    assert empty_output((0,), torch.float16, "cpu").numel() == 0


@pytest.mark.parametrize("bad", ["yes", "huge", "2"])
def test_bad_setting_is_an_option_error(monkeypatch, bad):
    monkeypatch.setenv(HUGE_PAGES_ENV, bad)
    with pytest.raises(OptionError, match=HUGE_PAGES_ENV):
        output_memory.huge_pages_wanted()
    big = torch.zeros(HUGE_MIN_BYTES // 2, dtype=torch.bfloat16)
    with pytest.raises(OptionError, match="expected auto, on"):
        modkern.mod_select(big, big, 0.9)


def test_auto_follows_free_page_reporting(monkeypatch):
    monkeypatch.setenv(HUGE_PAGES_ENV, "auto")
    monkeypatch.setattr(output_memory, "thp_available", lambda: True)
    for reported in (True, False):
        monkeypatch.setattr(output_memory, "free_pages_reported", lambda r=reported: r)
        assert output_memory.huge_pages_wanted() is not reported
    monkeypatch.setenv(HUGE_PAGES_ENV, "on")
    assert output_memory.huge_pages_wanted()
    monkeypatch.setattr(output_memory, "thp_available", lambda: False)
    assert not output_memory.huge_pages_wanted()


def fake_device(root: Path, name: str, device: str, features: str) -> None:
    (root / name).mkdir()
    (root / name / "device").write_text(device + "\n")
    (root / name / "features").write_text(features + "\n")


def test_free_pages_reported_reads_the_balloon_bit(tmp_path):
    with_bit, without_bit = "0" * 5 + "1" + "0" * 58, "1" * 5 + "0" + "1" * 58
    cases = {"reports": [("virtio0", "0x0005", with_bit)],
             "balloon without reporting": [("virtio0", "0x0005", without_bit)],
             "other device with the bit": [("virtio0", "0x0001", with_bit)],
             "none": []}
    for label, devices in cases.items():
        root = tmp_path / label.replace(" ", "_")
        root.mkdir()
        for device in devices:
            fake_device(root, *device)
        assert output_memory.free_pages_reported(root) is (label == "reports"), label
