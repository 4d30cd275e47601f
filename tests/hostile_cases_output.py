"""Hostile output paths and failing disks: OUT where it cannot or must not go, a disk that
fills up or runs out of inodes mid-merge, files the user cannot read."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple

import modkern.checkpoint.shard_writer as shard_writer
from hostile_cases import Case, Env, case, first_shard, merge_case, table, toy

# ---- 4. OUT --------------------------------------------------------------------------------


@case("out", "parent-is-a-file")
def _(env: Env):
    c, _, _, _ = merge_case(env, expect=("OUT", "afile", "is a file",
                                         "expected a folder to create OUT in"))
    (env.tmp / "afile").write_text("x")
    c.argv[3] = str(env.tmp / "afile" / "sub" / "out")
    return c


@case("out", "parent-not-writable", "unprivileged")
def _(env: Env):
    c, _, _, _ = merge_case(env, expect=("OUT", "not writable", "expected a writable folder"))
    (env.tmp / "locked").mkdir(mode=0o555)
    c.out = env.tmp / "locked" / "out"
    c.argv[3] = str(c.out)
    return c


@case("out", "parent-on-read-only-filesystem", "tmpfs")
def _(env: Env):
    c, _, _, _ = merge_case(env, expect=("OUT", "read-only filesystem"))
    c.out = env.mount(ro=True) / "out"
    c.argv[3] = str(c.out)
    return c


@case("out", "dangling-symlink")
def _(env: Env):
    c, _, _, out = merge_case(env, expect=("OUT", "dangling symlink", "nowhere"))
    os.symlink(env.tmp / "nowhere", out)
    return c


@case("out", "symlink-to-a-folder-with-force")
def _(env: Env):
    c, _, _, out = merge_case(env, "--force", expect=("OUT", "is a symlink", "real-out"))
    (env.tmp / "real-out").mkdir()
    (env.tmp / "real-out" / "keep.txt").write_text("mine")
    os.symlink(env.tmp / "real-out", out)
    c.inputs += (env.tmp / "real-out",)
    return c


@case("out", "is-a-file")
def _(env: Env):
    c, _, _, out = merge_case(env, expect=("OUT", "already exists", "--force"))
    out.write_text("mine")
    return c


@case("out", "is-a-file-with-force")
def _(env: Env):
    c, _, _, out = merge_case(env, "--force", expect=("OUT", "is not a folder"))
    out.write_text("mine")
    return c


@case("out", "inside-base-through-a-symlink")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("OUT", "inside BASE"))
    os.symlink(base, env.tmp / "link")
    c.argv[3] = str(env.tmp / "link" / "new")
    c.out = base / "new"
    return c


@case("out", "dotdot-into-other-with-force")
def _(env: Env):
    c, _, other, _ = merge_case(env, "--force", expect=("OUT", "is the OTHER folder"))
    c.argv[3] = str(other / "x" / "..")
    c.out = None  # OUT is OTHER itself: checked as an input
    return c


@case("out", "is-root-with-force")
def _(env: Env):
    c, _, _, _ = merge_case(env, "--force", expect=("OUT /", "contains BASE"))
    c.argv[3], c.out = "/", None
    return c


@case("out", "other-shard-links-into-out-with-force")
def _(env: Env):
    c, _, other, out = merge_case(env, "--force", expect=("OUT", "OTHER file", "links into it",
                                                          "holds no input's files"))
    out.mkdir()
    shard = first_shard(other)
    os.replace(shard, out / shard.name)
    os.symlink(out / shard.name, shard)
    return c


@case("out", "hf-blob-store-with-force")
def _(env: Env):
    """BASE is a Hugging Face cache snapshot; OUT is that repository's blob store."""
    repo = env.tmp / "hub" / "models--org--toy"
    snap = toy(repo / "snapshots" / "abc123", 0)
    (repo / "blobs").mkdir()
    for f in sorted(snap.iterdir()):
        os.replace(f, repo / "blobs" / f"blob-{f.name}")
        os.symlink(f"../../blobs/blob-{f.name}", f)
    other = toy(env.tmp / "other", 1, 2)
    out = repo / "blobs"
    return Case(["merge", str(snap), str(other), str(out), "--alpha", "0.9", "--force"],
                ("OUT", "BASE file", "links into it"), (repo, other), out)


@case("out", "mount-point-with-force", "tmpfs")
def _(env: Env):
    c, _, _, _ = merge_case(env, "--force", expect=("OUT", "mount point"))
    c.out = env.mount()
    (c.out / "keep.txt").write_text("mine")
    c.argv[3] = str(c.out)
    return c


@case("out", "name-with-terminal-escape-and-newline")
def _(env: Env):
    c, _, _, _ = merge_case(env, expect=("OUT", "\\x1b[2J", "\\n", "is a file"))
    (env.tmp / "afile").write_text("x")
    c.argv[3] = str(env.tmp / "afile" / "x\x1b[2J\ny")
    return c


# ---- 2./3. a disk that fills up ------------------------------------------------------------

_usage = namedtuple("usage", "total used free")


def _big_inputs(env: Env, out) -> Case:
    """Inputs whose merge writes ~700 KB in shards of at most 100 KB."""
    base, other = toy(env.tmp / "base", 0, rows=8192), toy(env.tmp / "other", 1, 2, rows=8192)
    env.monkeypatch.setattr(shutil, "disk_usage", lambda p: _usage(10**12, 0, 10**12))
    return Case(["merge", str(base), str(other), str(out), "--alpha", "0.9",
                 "--max-shard-size", "100KB"], ("OUT", "ENOSPC", "disk, or its inodes, is full"),
                (base, other), out)


@case("disk", "enospc-on-a-full-tmpfs", "tmpfs")
def _(env: Env):
    return _big_inputs(env, env.mount(size="256k") / "out")


@case("disk", "out-of-inodes-on-a-tmpfs", "tmpfs")
def _(env: Env):
    return _big_inputs(env, env.mount(size="8m", nr_inodes=3) / "out")


class _FullDisk:
    """Stands in for `open` in shard_writer: files that take `budget` bytes in all (then
    ENOSPC on write, and on the flush at close as a real full disk does), or refuse to be
    created after `files` files (out of inodes)."""

    def __init__(self, budget: int = 10**12, files: int = 10**6):
        self.budget, self.files = budget, files

    def __call__(self, path, mode="r", *a, **kw):
        if "w" in mode:
            if self.files == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            self.files -= 1
            return _FullFile(open(path, mode, *a, **kw), self)
        return open(path, mode, *a, **kw)


class _FullFile:
    def __init__(self, file, disk: _FullDisk):
        self.file, self.disk, self.unflushed = file, disk, 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.disk.budget:
            self.unflushed += n
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.budget -= n
        return self.file.write(data)

    def flush(self) -> None:
        if self.unflushed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.file.close()


@case("disk", "enospc-injected-writer")
def _(env: Env):
    env.monkeypatch.setattr(shard_writer, "open", _FullDisk(budget=300_000), raising=False)
    return _big_inputs(env, env.tmp / "out")


@case("disk", "out-of-inodes-injected-writer")
def _(env: Env):
    env.monkeypatch.setattr(shard_writer, "open", _FullDisk(files=1), raising=False)
    return _big_inputs(env, env.tmp / "out")


# ---- files the user may not read ---------------------------------------------------------


def _unreadable(env: Env, model: str, file: str, expect: tuple[str, ...]) -> Case:
    c, base, other, _ = merge_case(env, expect=(model.upper(), *expect, "Permission denied"))
    folder = base if model == "base" else other
    os.chmod(first_shard(folder) if file == "first shard" else folder / file, 0)
    return c


table("unreadable", _unreadable, [
    ("tokenizer", "base", "tokenizer.json", ("tokenizer.json",)),
    ("generation-config", "base", "generation_config.json", ("generation_config.json",)),
    ("base-folder", "base", ".", ("cannot read the folder",)),
    ("other-shard", "other", "first shard", ("model-00001-of-00002",)),
], "unprivileged")


@case("unreadable", "recipe", "unprivileged")
def _(env: Env):
    c, _, _, _ = merge_case(env, expect=("recipe", "Permission denied"))
    recipe = env.tmp / "recipe.yaml"
    recipe.write_text("alpha: 0.5\n")
    os.chmod(recipe, 0)
    c.argv += ["--recipe", str(recipe)]
    return c



# ---- neighbours ----------------------------------------------------------------------------


@case("out", "name-longer-than-the-filesystem-allows")
def _(env: Env):
    c, _, _, _ = merge_case(env, expect=("OUT", "has 300 bytes", "expected at most 255"))
    c.out = env.tmp / ("n" * 300)
    c.argv[3] = str(c.out)
    return c


@case("out", "parent-is-a-fifo")
def _(env: Env):
    c, _, _, _ = merge_case(env, expect=("OUT", "is a FIFO", "expected a folder"))
    os.mkfifo(env.tmp / "pipe")
    c.argv[3] = str(env.tmp / "pipe" / "out")
    return c


@case("out", "base-given-through-a-link-into-out-with-force")
def _(env: Env):
    c, base, _, out = merge_case(env, "--force", expect=("OUT", "contains BASE"))
    out.mkdir()
    os.replace(base, out / "base")
    os.symlink(out / "base", base)
    c.inputs = (base, out)
    return c


@case("out", "existing-out-not-writable-with-force", "unprivileged")
def _(env: Env):
    c, _, _, out = merge_case(env, "--force", expect=("OUT", "is not writable",
                                                      "cannot be replaced"))
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    os.chmod(out, 0o555)
    return c


@case("messages", "base-path-too-long")
def _(env: Env):
    c, _, _, _ = merge_case(env, expect=("BASE", "File name too long"))
    c.argv[1] = str(env.tmp / ("b" * 300))
    return c
