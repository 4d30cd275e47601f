"""Publishing OUT: merges racing for one OUT (one wins, the other gets one clear error,
nothing is left behind), with the kernel's no-replace rename and with the fallback;
OUT paths normalised before any work; writers whose abort never raises."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
from hostile_cases import toy

import modkern.checkpoint.publish as publish
from modkern.checkpoint.merge import merge_checkpoints
from modkern.checkpoint.shard_writer import BackgroundWriter, PlannedTensor, ShardWriter, \
    plan_shards
from modkern.cli import main
from modkern.errors import CheckpointError

ROUNDS = 200


def _race(fns: list) -> list:
    """Run the functions at once (a barrier releases them together); return each one's
    result or exception."""
    barrier = threading.Barrier(len(fns))
    results: list = [None] * len(fns)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i]()
        except BaseException as err:  # noqa: BLE001 - collected for the assertions
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _publish_rounds(tmp_path: Path, replace: bool) -> None:
    out = tmp_path / "out"
    for k in range(ROUNDS):
        tmps = []
        for who in ("a", "b"):
            t = tmp_path / f".out.modkern-tmp-1-{who}{k:x}"
            t.mkdir()
            (t / "who").write_text(who)
            tmps.append(t)
        results = _race([lambda t=t: publish.publish(t, out, replace) for t in tmps])
        errors = [r for r in results if isinstance(r, BaseException)]
        if replace:
            assert errors == [], errors
        else:
            assert len(errors) == 1, results
            assert isinstance(errors[0], CheckpointError), repr(errors[0])
            assert "appeared while merging" in str(errors[0])
            loser = tmps[results.index(errors[0])]
            assert (loser / "who").exists()  # left for the caller, which removes it
            publish._remove(loser)
        assert (out / "who").read_text() in ("a", "b")
        assert [p.name for p in tmp_path.iterdir()] == ["out"], list(tmp_path.iterdir())
        publish._remove(out)


@pytest.mark.parametrize("replace", [False, True])
def test_racing_publications_renameat2(tmp_path, replace):
    _publish_rounds(tmp_path, replace)


@pytest.mark.parametrize("replace", [False, True])
def test_racing_publications_without_renameat2(tmp_path, monkeypatch, replace):
    """Where the kernel or libc lacks renameat2: plain renames, which refuse a non-empty
    OUT, and two renames for a replacement."""
    monkeypatch.setattr(publish, "_rename_flags", lambda a, b, flags: errno.ENOSYS)
    _publish_rounds(tmp_path, replace)


def test_racing_merges_into_one_out(tmp_path):
    """The race the issue saw (ENOTEMPTY in 1 run of 6): two merges into one new OUT, again
    and again. One wins; the other ends with one CheckpointError; nothing else is left."""
    base, other = toy(tmp_path / "base", 0), toy(tmp_path / "other", 1, shards=2)
    out = tmp_path / "out"
    for _ in range(20):
        results = _race([lambda a=a: merge_checkpoints(base, other, out, a, progress=False)
                         for a in (0.3, 0.7)])
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1, results
        assert isinstance(errors[0], CheckpointError), repr(errors[0])
        assert "appeared while merging" in str(errors[0]) or "already exists" in str(errors[0])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "other", "out"]
        publish._remove(out)


def test_out_with_dotdot_is_normalised_before_any_work(tmp_path, capsys):
    base, other = toy(tmp_path / "base", 0), toy(tmp_path / "other", 1)
    assert main(["merge", str(base), str(other), str(tmp_path / "new" / "x" / ".."),
                 "--alpha", "0.9", "-q"]) == 0
    assert (tmp_path / "new" / "model.safetensors").is_file()
    assert not (tmp_path / "new" / "x").exists()
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "old.txt").write_text("old")
    assert main(["merge", str(base), str(other), str(tmp_path / "target" / "x" / ".."),
                 "--alpha", "0.9", "--force", "-q"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == sorted(
        p.name for p in (tmp_path / "new").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "new", "other", "target"]


class _BrokenFile:
    """A shard file on a full disk: every write and the flush at close fail."""

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    flush = write

    def fileno(self):
        return 0

    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_writer_abort_never_raises(tmp_path):
    import torch
    shards = plan_shards([PlannedTensor("w", torch.float32, (4,))], 10**6)
    writer = ShardWriter(tmp_path, shards)
    writer._file, writer._shard = _BrokenFile(), 0
    writer.abort()  # the buffered bytes cannot be flushed: closed anyway, nothing raised
    assert writer._file is None
    background = BackgroundWriter(ShardWriter(tmp_path, shards))
    background.writer._file, background.writer._shard = _BrokenFile(), 0
    background.write("w", torch.zeros(4))
    background.abort()  # the failed write and the failed close are both swallowed


def test_out_with_a_name_near_the_limit_merges(tmp_path):
    """The temporary folder keeps only the start of OUT's name, so an OUT whose name is
    close to the filesystem's 255 bytes still gets its temporary folder beside it."""
    base, other = toy(tmp_path / "base", 0), toy(tmp_path / "other", 1)
    out = tmp_path / ("o" * 250)
    merge_checkpoints(base, other, out, 0.9, progress=False)
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", "other", out.name])
