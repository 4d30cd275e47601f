"""Reading files of untrusted input folders: only regular files that resolve inside the
folder, or inside the blob store of the Hugging Face cache the folder is a snapshot of.

A checkpoint folder may come from anyone. Without this rule a folder whose `tokenizer.json`
is a symlink to `/proc/self/environ` would have that file copied into the merge's output,
and a shard that is a FIFO or `/dev/zero` would hang or exhaust a reader. Each file is
resolved, checked, then opened without following a final symlink, and the open file is
compared with what was checked (its kernel path, or device and inode), so a component
swapped between the check and the open is caught rather than followed.

JSON from an input (headers, index, config) goes through `parse_json`: one CheckpointError
for every way `json.loads` can fail (nesting too deep, integers too long, bad bytes), and
duplicated keys refused (a reader would silently keep the last).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# JSON files read whole (index, config) larger than this are not what they claim to be.
MAX_JSON = 100 * 1024 * 1024
# A Hugging Face cache repository: `models--org--name/snapshots/<rev>/FILE -> ../../blobs/<hash>`.
HF_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink"))


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for a non-regular st_mode."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def blob_store(folder_real: Path) -> Path | None:
    """The `blobs` folder of the Hugging Face cache repository whose snapshot `folder_real`
    (a resolved path) is, or None when it is not a cache snapshot."""
    snapshots, repo = folder_real.parent, folder_real.parent.parent
    if snapshots.name == "snapshots" and repo.name.startswith(HF_REPO_PREFIXES):
        return repo / "blobs"
    return None


def _allowed(real: Path, folder_real: Path) -> bool:
    if real.is_relative_to(folder_real) and real != folder_real:
        return True
    blobs = blob_store(folder_real)
    return blobs is not None and real.parent == blobs


def _where(label: str, path: Path) -> str:
    return f"{label} {path}" if label else str(path)


def _target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def check_input_file(folder: Path, name: str, label: str) -> tuple[Path, os.stat_result] | None:
    """Check `folder/name` (`name` a plain file name; `label` names the model in errors):
    None when nothing is there, else its resolved path and stat. Raises CheckpointError
    naming the file and where it points unless it is a regular file that resolves inside
    the folder (or its Hugging Face cache blob store)."""
    path = folder / name
    where = _where(label, path)
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CheckpointError(f"{where}: cannot access: {err.strerror}; expected a readable "
                              "file") from None
    folder_real = Path(os.path.realpath(folder))
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(real, follow_symlinks=False)
    except OSError as err:
        if os.path.islink(path) and isinstance(err, FileNotFoundError):
            raise CheckpointError(f"{where}: is a dangling symlink (to {_target(path)}); "
                                  "expected a regular file") from None
        raise CheckpointError(f"{where}: cannot access (symlink to {_target(path)}): "
                              f"{err.strerror}; expected a regular file") from None
    if stat.S_ISLNK(st.st_mode):  # realpath stops where links loop (or nest too deep)
        raise CheckpointError(f"{where}: is a symlink loop (to {_target(path)}); expected a "
                              "regular file")
    if not _allowed(real, folder_real):
        raise CheckpointError(f"{where}: resolves to {real}, outside the folder; expected a "
                              f"regular file inside {folder_real} (or in the Hugging Face "
                              "cache's blob store of a snapshot folder)")
    if not stat.S_ISREG(st.st_mode):
        via = f" (through the symlink to {real})" if real != path else ""
        raise CheckpointError(f"{where}: is {file_kind(st.st_mode)}{via}; expected a regular "
                              "file")
    return real, st


def open_checked(real: Path, st: os.stat_result, where: str) -> int:
    """Open the file `check_input_file` resolved, without following a final symlink, and
    make sure the open file is the one checked. Returns a read-only file descriptor."""
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink where a file was checked
            raise CheckpointError(f"{where}: changed while it was being opened (now a "
                                  "symlink); expected the regular file checked a moment "
                                  "before") from None
        raise CheckpointError(f"{where}: cannot open: {err.strerror}; expected a readable "
                              "regular file") from None
    try:
        now = os.fstat(fd)
        opened = _opened_path(fd)
        same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
        if not stat.S_ISREG(now.st_mode) or not same or opened not in (None, str(real)):
            raise CheckpointError(f"{where}: changed while it was being opened (now "
                                  f"{opened or file_kind(now.st_mode)}); expected the "
                                  "regular file checked a moment before")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _opened_path(fd: int) -> str | None:
    """The kernel's path of an open file (Linux /proc), or None where there is none."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def open_input(folder: Path, name: str, label: str) -> int | None:
    """`check_input_file` then `open_checked`: a read-only descriptor, or None when absent."""
    found = check_input_file(folder, name, label)
    if found is None:
        return None
    return open_checked(*found, _where(label, folder / name))


def read_fd(fd: int, where: str, limit: int = MAX_JSON) -> bytes:
    """All of an open regular file (at most `limit` bytes, else CheckpointError)."""
    size = os.fstat(fd).st_size
    if size > limit:
        raise CheckpointError(f"{where}: {size} bytes; expected a file of at most {limit}")
    chunks, total = [], 0
    try:
        while True:
            block = os.read(fd, 1 << 20)
            if not block:
                return b"".join(chunks)
            total += len(block)
            if total > limit:
                raise CheckpointError(f"{where}: grew past {limit} bytes while being read; "
                                      "expected a file that does not change")
            chunks.append(block)
    except OSError as err:
        raise CheckpointError(f"{where}: cannot read: {err.strerror}") from None


def read_input(folder: Path, name: str, label: str, limit: int = MAX_JSON) -> bytes | None:
    """The bytes of `folder/name` read under the input-file rule, or None when absent."""
    fd = open_input(folder, name, label)
    if fd is None:
        return None
    try:
        return read_fd(fd, _where(label, folder / name), limit)
    finally:
        os.close(fd)


class _Duplicate(Exception):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _no_constant(name: str):
    raise ValueError(f"the non-standard constant {name}")


def _max_digits() -> int:
    return getattr(sys, "get_int_max_str_digits", lambda: 4300)()


def parse_json(raw: bytes | str, where: str, expected: str, allow_nan: bool = True) -> Any:
    """`json.loads` whose every failure is one CheckpointError: '{where}: not valid JSON
    (why); expected {expected}'. Duplicated keys are refused, and NaN/Infinity unless
    `allow_nan`."""
    try:
        return json.loads(raw, object_pairs_hook=_unique,
                          **({} if allow_nan else {"parse_constant": _no_constant}))
    except _Duplicate as dup:
        why = f"the key {dup.args[0]!r} appears twice"
    except RecursionError:
        why = "nested too deeply"
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    except json.JSONDecodeError as err:
        why = f"{err.msg} at line {err.lineno} column {err.colno}"
    except ValueError as err:  # an integer too long to convert, or a refused constant
        why = (f"an integer of more than {_max_digits()} digits"
               if "digits" in str(err) else str(err))
    raise CheckpointError(f"{where}: not valid JSON ({why}); expected {expected}")
