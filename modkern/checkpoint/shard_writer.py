"""Writing safetensors shards as a stream: the layout is planned from names, dtypes and
shapes before any tensor exists, so each shard's header is written first and every tensor
is appended the moment it is ready. Nothing but the tensor in hand is held in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from .folder import INDEX, SINGLE
from .publish import output_error
from .safetensors_io import DTYPE_NAMES


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', 1000 -> bytes (decimal units as in transformers; *iB binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise CheckpointError(f"max shard size {text!r}: expected a size such as '5GB', "
                              "'500MB' or a number of bytes")
    unit = m.group(2).rstrip("B") or ""
    base = 1024 if unit.endswith("I") else 1000
    power = " KMGT".index(unit[:1] or " ")
    size = int(float(m.group(1)) * base ** power)
    if size <= 0:
        raise CheckpointError(f"max shard size {text!r}: expected a positive size")
    return size


@dataclass
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Shard:
    file: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def header(self) -> bytes:
        """The shard's safetensors header (length prefix included), padded with spaces so
        the data starts 8-byte aligned."""
        entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for t in self.tensors:
            entries[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [pos, pos + t.nbytes]}
            pos += t.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        return len(raw).to_bytes(8, "little") + raw


def plan_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[Shard]:
    """Fill shards in order up to max_shard_size bytes (a bigger tensor gets its own);
    one shard is named model.safetensors, several model-0000i-of-0000n.safetensors."""
    shards: list[Shard] = [Shard("")]
    for t in tensors:
        if shards[-1].tensors and shards[-1].nbytes + t.nbytes > max_shard_size:
            shards.append(Shard(""))
        shards[-1].tensors.append(t)
    n = len(shards)
    for i, s in enumerate(shards, 1):
        s.file = SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
    return shards


def write_index(folder: Path, shards: list[Shard]) -> None:
    """Write model.safetensors.index.json when there are several shards."""
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
                 "weight_map": {t.name: s.file for s in shards for t in s.tensors}}
        try:
            (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        except OSError as err:
            raise output_error(folder / INDEX, err, "write") from None


@contextmanager
def _writing(path: Path):
    """OSError while writing `path` (ENOSPC, EIO...) -> CheckpointError naming OUT."""
    try:
        yield
    except OSError as err:
        raise output_error(path, err, "write") from None


def data_offsets(shards: list[Shard]) -> dict[str, tuple[int, int]]:
    """name -> (shard index, absolute byte offset of the tensor's data in that file)."""
    where: dict[str, tuple[int, int]] = {}
    for i, s in enumerate(shards):
        pos = len(s.header())
        for t in s.tensors:
            where[t.name] = (i, pos)
            pos += t.nbytes
    return where


def preallocate(folder: Path, shards: list[Shard]) -> None:
    """Create every shard file at its final size: header written, data left to be filled
    (sparse) by PositionedWriter, possibly from several processes at once."""
    for s in shards:
        with _writing(folder / s.file), open(folder / s.file, "wb") as f:
            f.write(s.header())
            f.truncate(len(s.header()) + s.nbytes)
            f.flush()
            os.fsync(f.fileno())


class PositionedWriter:
    """Writes tensors, or row blocks of tensors, at their planned place in preallocated
    shard files (see `preallocate`) with positioned writes: any subset of the tensors, in
    any order, so that several processes can fill one set of shards. Same `write`/`finish`/
    `abort` interface as ShardWriter (usable under BackgroundWriter)."""

    def __init__(self, folder: Path, shards: list[Shard]):
        self.folder = folder
        self.shards = shards
        self._where = data_offsets(shards)
        self._planned = {t.name: t for s in shards for t in s.tensors}
        self._fds: dict[int, int] = {}
        self.bytes_written = 0

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            path = self.folder / self.shards[shard].file
            with _writing(path):
                self._fds[shard] = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fds[shard]

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Write `tensor` as tensor `name`'s rows starting at `row` (the whole tensor when
        row is 0 and the shapes agree); dtype and trailing dimensions must be as planned."""
        planned = self._planned[name]
        rows = tensor.shape[0] if tensor.dim() else 1
        fits = (tensor.dim() > 0) == (len(planned.shape) > 0) and \
            tuple(tensor.shape[1:]) == planned.shape[1:] and \
            0 <= row and row + rows <= (planned.shape[0] if planned.shape else 1)
        if tensor.dtype != planned.dtype or not fits:
            raise CheckpointError(f"internal: writing {name!r} {tensor.dtype} "
                                  f"{list(tensor.shape)} at row {row}, planned "
                                  f"{planned.dtype} {list(planned.shape)}")
        shard, start = self._where[name]
        data = tensor.detach().to("cpu").contiguous().view(-1)
        row_bytes = data.element_size() * math.prod(planned.shape[1:])
        view = memoryview(data.view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
        pos, fd = start + row * row_bytes, self._fd(shard)
        done = 0
        with _writing(self.folder / self.shards[shard].file):
            while done < len(view):
                done += os.pwrite(fd, view[done:], pos + done)
        self.bytes_written += len(view)

    def finish(self) -> None:
        """Flush this process's writes to disk (fsync) and close its files."""
        try:
            for shard, fd in self._fds.items():
                with _writing(self.folder / self.shards[shard].file):
                    os.fsync(fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close every file; never raises (it runs while another error is on its way)."""
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


class ShardWriter:
    """Writes planned shards into `folder`, tensor by tensor, in plan order."""

    def __init__(self, folder: Path, shards: list[Shard]):
        self.folder = folder
        self.shards = shards
        self._order = [(i, t) for i, s in enumerate(shards) for t in s.tensors]
        self._next = 0
        self._file = None
        self._shard = -1
        self.bytes_written = 0

    def _path(self, i: int) -> Path:
        return self.folder / self.shards[i].file

    def _open(self, i: int) -> None:
        self._close()
        with _writing(self._path(i)):
            self._file = open(self._path(i), "wb")
            self._shard = i
            self._file.write(self.shards[i].header())

    def _close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with _writing(self._path(self._shard)):
                try:
                    file.flush()
                    os.fsync(file.fileno())
                finally:
                    _close_quietly(file)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (must come in plan order, with its dtype/shape)."""
        i, planned = self._order[self._next]
        if name != planned.name or tensor.dtype != planned.dtype or \
                tuple(tensor.shape) != planned.shape:
            raise CheckpointError(f"internal: writing {name!r} {tensor.dtype} "
                                  f"{list(tensor.shape)}, planned {planned.name!r} "
                                  f"{planned.dtype} {list(planned.shape)}")
        if i != self._shard:
            self._open(i)
        data = tensor.detach().to("cpu").contiguous().view(-1)
        if data.numel():
            with _writing(self._path(i)):
                self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self.bytes_written += planned.nbytes
        self._next += 1

    def finish(self) -> None:
        """Close the last shard and write the index (when sharded); checks all were written."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise CheckpointError(f"internal: tensor {missing!r} was planned but not written")
        for i, s in enumerate(self.shards):  # shards with no tensor: header only
            if not s.tensors and i != self._shard:
                self._open(i)
        self._close()
        write_index(self.folder, self.shards)

    def abort(self) -> None:
        """Close the open shard without flushing what a full disk refused; never raises
        (it runs while another error is on its way, and the folder is removed next)."""
        if self._file is not None:
            file, self._file = self._file, None
            _close_quietly(file)


def _close_quietly(file) -> None:
    """Close a buffered file even when flushing its buffer fails (the descriptor is closed
    either way); the caller reports the write error it already has."""
    try:
        file.close()
    except OSError:
        pass


class BackgroundWriter:
    """A ShardWriter whose writes run on one background thread, so that writing tensor i
    overlaps reading and merging tensor i+1 (file writes release the GIL). At most one
    write is in flight: `write` waits for the previous one (and raises its error)."""

    def __init__(self, writer: ShardWriter):
        self.writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modkern-write")
        self._pending: Future | None = None

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def write(self, name: str, tensor: torch.Tensor, *where) -> None:
        self._wait()
        self._pending = self._pool.submit(self.writer.write, name, tensor, *where)

    def finish(self) -> None:
        try:
            self._wait()
            self.writer.finish()
        finally:
            self._pool.shutdown()

    def abort(self) -> None:
        """Stop writing; never raises (the caller's error is the one to report)."""
        try:
            self._wait()
        except BaseException:  # noqa: BLE001 - already failing; the first error wins
            pass
        try:
            self._pool.shutdown()
        finally:
            self.writer.abort()
