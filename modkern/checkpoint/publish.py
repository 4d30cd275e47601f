"""Atomic publication of an output folder: build it in a temporary folder beside OUT, then
rename it into place in one step.

A merge killed at any moment leaves OUT absent, or (when replacing) the previous OUT
intact: the previous folder is swapped out by one `renameat2(RENAME_EXCHANGE)` where the
kernel has it, else by two renames with the old folder kept under a temporary name until the
new one is in place. A new OUT is put in place by `renameat2(RENAME_NOREPLACE)`, so two
merges into one OUT cannot both win: the second gets "appeared while merging" (where the
kernel lacks it, a plain rename, which also refuses a non-empty OUT). Temporary folders are
named `.OUT.modkern-tmp-<pid>-<random>`; those of dead processes are removed by the next
merge into the same OUT.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
from pathlib import Path

from ..errors import CheckpointError

# How much of OUT's name a temporary folder's name keeps (a file name has at most 255 bytes).
NAME_KEEP = 100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_TEMP = re.compile(r"\.(.+)\.modkern-tmp-(\d+)-[0-9a-f]+(-old)?")
# errno values meaning "this rename flag is not supported here": fall back.
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)
_HINTS = {errno.ENOSPC: "the disk, or its inodes, is full",
          errno.EDQUOT: "the disk quota is used up",
          errno.EROFS: "the filesystem is read-only",
          errno.EACCES: "no permission", errno.EPERM: "not permitted"}


def temp_folder(out: Path) -> Path:
    """Create and return a fresh temporary folder beside `out` (same filesystem)."""
    remove_stale(out)
    name = f".{out.name[:NAME_KEEP]}.modkern-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out.parent / name
    try:
        tmp.mkdir()
    except OSError as err:
        raise output_error(tmp, err, "create the temporary folder") from None
    return tmp


def out_of_temp(path: Path) -> Path | None:
    """The OUT a path inside (or of) a temporary folder belongs to, else None (its name cut
    to NAME_KEEP characters, as the temporary folder keeps it)."""
    for p in (path, *path.parents):
        m = _TEMP.fullmatch(p.name)
        if m:
            return p.parent / m.group(1)
    return None


def output_error(path: Path, err: OSError, doing: str) -> CheckpointError:
    """A failed write into the output as one line: OUT, the file, the reason and errno."""
    out = out_of_temp(path)
    if out is None:
        out, what = path, ""
    else:
        tmp = next(p for p in (path, *path.parents) if _TEMP.fullmatch(p.name))
        what = f" {path.relative_to(tmp)}" if path != tmp else ""
    code = errno.errorcode.get(err.errno or 0, "?")
    hint = _HINTS.get(err.errno or 0)
    reason = f"{err.strerror or err} ({code}{': ' + hint if hint else ''})"
    return CheckpointError(f"OUT {out}: cannot {doing}{what}: {reason}; expected enough free "
                           "space, inodes and permission to write the output")


def remove_stale(out: Path) -> None:
    """Remove temporary folders left beside `out` by merges that were killed (best effort:
    what cannot be removed now is tried again by the next merge)."""
    pattern = re.compile(re.escape(f".{out.name[:NAME_KEEP]}.modkern-tmp-") +
                         r"(\d+)-[0-9a-f]+(-old)?")
    try:
        if not out.parent.is_dir():
            return
        entries = sorted(out.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.fullmatch(p.name)
        if not m or not p.is_dir() or p.is_symlink() or _alive(int(m.group(1))):
            continue
        try:
            if m.group(2) and not os.path.lexists(out):  # killed mid-swap: restore it
                os.rename(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


_renameat2 = None


def _rename_flags(a: Path, b: Path, flags: int) -> int:
    """renameat2(a, b, flags): 0, or the errno (ENOSYS where libc lacks it)."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2 is False:
        return errno.ENOSYS
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags)
    return 0 if rc == 0 else ctypes.get_errno()


def _rename_new(tmp: Path, out: Path) -> bool:
    """Rename tmp to out unless out exists (atomically where the kernel can): False when it
    exists."""
    err = _rename_flags(tmp, out, _RENAME_NOREPLACE)
    if err == 0:
        return True
    if err == errno.EEXIST:
        return False
    if err not in _UNSUPPORTED:
        raise OSError(err, os.strerror(err), str(tmp), None, str(out))
    if os.path.lexists(out):
        return False
    try:  # a plain rename refuses a non-empty folder (and a file) at out, not an empty one
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    return True


def _swap(tmp: Path, out: Path) -> bool:
    """Put tmp at out in place of the existing out, then delete the previous one; False when
    out vanished meanwhile (a concurrent merge)."""
    err = _rename_flags(tmp, out, _RENAME_EXCHANGE)
    if err == 0:  # tmp now holds the previous OUT
        _fsync_dir(out.parent)
        _remove(tmp)
        return True
    if err == errno.ENOENT:
        return False
    if err not in _UNSUPPORTED:
        raise OSError(err, os.strerror(err), str(tmp), None, str(out))
    old = out.parent / f"{tmp.name}-old"
    try:
        os.rename(out, old)  # from here until the next rename, OUT is absent; old is intact
    except FileNotFoundError:
        return False
    if not _rename_new(tmp, out):  # another merge published meanwhile: it wins
        _remove(old)
        return False
    _fsync_dir(out.parent)
    _remove(old)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, out: Path, replace: bool) -> None:
    """Move the complete folder `tmp` to `out`. With `replace`, an existing `out` is swapped
    out atomically and then deleted; without, an existing `out` (even one that appears
    while this runs) is an error and `tmp` is left for the caller to remove."""
    try:
        _fsync_dir(tmp)
        for _ in range(8):  # OUT may appear or vanish under concurrent merges
            if _rename_new(tmp, out):
                _fsync_dir(out.parent)
                return
            if not replace:
                raise CheckpointError(f"OUT {out}: appeared while merging; expected it absent "
                                      "(pass --force to replace it)")
            if _swap(tmp, out):
                return
    except OSError as err:
        raise output_error(tmp, err, "publish it") from None
    raise CheckpointError(f"OUT {out}: kept changing while this merge published (other "
                          "merges into it?); expected one merge at a time into one OUT")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
