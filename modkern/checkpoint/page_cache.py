"""How much of a file the page cache holds: evict a file, count its resident bytes.

Used to measure what a merge really read from disk (a counter of bytes asked for misses the
kernel's readahead). Linux only: `posix_fadvise(DONTNEED)` to evict (after fsync, since dirty
pages stay), `mincore` through ctypes on a fresh mapping (mapping touches no page) to count.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

from .safetensors_io import PAGE

_libc = None


def _lib():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = lib
    return _libc


def evict(path: str | os.PathLike) -> None:
    """Drop a file's pages from the page cache (written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: str | os.PathLike) -> int:
    """Bytes of the file that are in the page cache now (whole pages, capped at its size)."""
    size = Path(path).stat().st_size
    if size == 0:
        return 0
    lib = _lib()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if lib.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
            resident = sum(1 for b in bytes(vec) if b & 1)
        finally:
            lib.munmap(addr, size)
    finally:
        os.close(fd)
    return min(resident * PAGE, size)


def evict_files(paths) -> None:
    for p in paths:
        evict(p)


def resident_total(paths) -> int:
    return sum(resident_bytes(p) for p in paths)
