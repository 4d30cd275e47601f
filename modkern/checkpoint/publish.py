"""Atomic publication of an output folder: build it in a temporary folder beside OUT, then
rename it into place in one step.

A merge killed at any moment leaves OUT absent, or (when replacing) the previous OUT
intact: the previous folder is swapped out by one `renameat2(RENAME_EXCHANGE)` where the
kernel has it, else by two renames with the old folder kept under a temporary name until the
new one is in place. Temporary folders are named `.OUT.modkern-tmp-<pid>-<random>`; those of
dead processes are removed by the next merge into the same OUT.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import secrets
import shutil
from pathlib import Path

from ..errors import CheckpointError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def temp_folder(out: Path) -> Path:
    """Create and return a fresh temporary folder beside `out` (same filesystem)."""
    remove_stale(out)
    tmp = out.parent / f".{out.name}.modkern-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def remove_stale(out: Path) -> None:
    """Remove temporary folders left beside `out` by merges that were killed."""
    pattern = re.compile(re.escape(f".{out.name}.modkern-tmp-") + r"(\d+)-[0-9a-f]+(-old)?")
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir() or _alive(int(m.group(1))):
            continue
        if m.group(2) and not out.exists():  # killed mid-swap: the previous OUT, restore it
            os.rename(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False when the kernel or libc cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, out: Path, replace: bool) -> None:
    """Move the complete folder `tmp` to `out`. With `replace`, an existing `out` is swapped
    out atomically and then deleted; without, an existing `out` is an error."""
    _fsync_dir(tmp)
    if out.exists() or out.is_symlink():
        if not replace:
            raise CheckpointError(f"OUT {out}: appeared while merging; expected it absent "
                                  "(pass --force to replace it)")
        if _exchange(tmp, out):  # tmp now holds the previous OUT
            _fsync_dir(out.parent)
            _remove(tmp)
            return
        old = out.parent / f"{tmp.name}-old"
        os.rename(out, old)  # from here until the next rename, OUT is absent; old is intact
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        _remove(old)
        return
    os.rename(tmp, out)
    _fsync_dir(out.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
