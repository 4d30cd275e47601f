"""Reading safetensors files with positioned reads: a validated header, whole tensors, and
only the pages of a tensor that hold chosen elements.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (per tensor:
dtype, shape, data_offsets relative to the end of the header; optional `__metadata__`), then
the tensor bytes back to back. Everything here is read with `os.pread` on a plain file
descriptor, never through mmap: a page fault on a mapped file makes the kernel read ahead
megabytes, while a positioned read with POSIX_FADV_RANDOM brings in only the pages asked for.
That is what lets a merge read the few percent of the other model that it selects.
"""

from __future__ import annotations

import bisect
import math
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .input_files import check_input_file, open_checked, file_kind, parse_json

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# Positioned reads in flight when reading scattered pages.
READERS = 4
# Header lengths beyond this are not a real header (the format's own limit is 100 MB).
MAX_HEADER = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its file: absolute byte offset, length, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, from the start of the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def meta(self) -> torch.Tensor:
        """A tensor on the meta device with this dtype and shape (for validation helpers
        that take tensors, without reading any data)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


# Element counts and byte sizes must fit torch's int64 stride arithmetic, even when another
# dimension is 0 (torch computes strides of an empty tensor too).
MAX_ELEMENTS = 2**63 - 1


def _is_count(x) -> bool:
    return type(x) is int and x >= 0  # bool is an int subclass: `true` is no dimension


def _tensor_info(file: str, name: str, entry, data_start: int) -> TensorInfo:
    """One header entry -> TensorInfo, or CheckpointError naming what is wrong with it."""
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{where}: corrupt header entry {_short(entry)}; expected an "
                              "object with dtype, shape and data_offsets")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {_short(dtype_name)}; expected one of "
                              f"{sorted(DTYPES)}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CheckpointError(f"{where}: corrupt shape {_short(shape)}; expected a list of "
                              "non-negative whole numbers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: corrupt data_offsets {_short(offsets)}; expected "
                              "[begin, end] with 0 <= begin <= end")
    dtype = DTYPES[dtype_name]
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize > MAX_ELEMENTS:
        raise CheckpointError(f"{where}: shape {_short(shape)} is too large for any tensor; "
                              "expected a real tensor's shape")
    begin, end = offsets
    info = TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin)
    if info.numel * info.itemsize != info.nbytes:
        raise CheckpointError(f"{where}: data_offsets span {info.nbytes} bytes but "
                              f"{dtype_name} {list(shape)} needs "
                              f"{info.numel * info.itemsize}; the file is corrupt")
    return info


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_header(path: Path, raw: bytes, file_size: int, label: str = ""
                 ) -> tuple[dict[str, TensorInfo], dict]:
    """Validate a safetensors header (the JSON after the 8-byte length) against the file
    size; return {name: TensorInfo} in file order and the `__metadata__` dict.

    Raises CheckpointError naming the model (`label`), file and tensor for anything a
    reader could trip on: bad JSON (also nested too deep, duplicated keys, NaN), unknown
    dtype, a shape that is not a list of whole numbers or too large, a byte length that does
    not match the shape, overlapping or out-of-file offsets, a file shorter than its header
    says (truncated)."""
    data_start = 8 + len(raw)
    file = f"{label} {path}" if label else str(path)
    header = parse_json(raw, f"{file}: corrupt safetensors header",
                        "a safetensors file (JSON header of tensor entries)", allow_nan=False)
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (a JSON "
                              f"{type(header).__name__}); expected a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{file}: corrupt __metadata__ {_short(metadata)}; expected an "
                              "object of strings")
    infos = [_tensor_info(file, name, entry, data_start) for name, entry in header.items()]
    infos.sort(key=lambda i: (i.offset, i.nbytes))
    pos = data_start
    for info in infos:
        if info.offset < pos:
            raise CheckpointError(f"{file}: tensor {info.name!r} overlaps the previous tensor "
                                  "or the header; the file is corrupt")
        pos = info.offset + info.nbytes
    if pos > file_size:
        last = infos[-1].name if infos else "(header)"
        raise CheckpointError(f"{file}: truncated: tensor {last!r} ends at byte {pos} but the "
                              f"file has {file_size} bytes; expected a complete safetensors "
                              "file (re-download or re-save it)")
    return {i.name: i for i in infos}, metadata


def open_weight_file(path: Path, folder: Path | None, label: str = "") -> int:
    """A read-only descriptor of the weight file `path`: a regular file, and when `folder`
    is given one that resolves inside it (or its Hugging Face cache blob store), opened
    without following a swapped-in symlink. CheckpointError naming the model and file
    otherwise."""
    where = f"{label} {path}" if label else str(path)
    if folder is not None:
        found = check_input_file(folder, path.name, label)
        if found is None:
            raise CheckpointError(f"{where}: missing; expected a safetensors file")
        return open_checked(*found, where)
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(real, follow_symlinks=False)
    except OSError as err:
        raise CheckpointError(f"{where}: cannot open: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{where}: is {file_kind(st.st_mode)}; expected a regular file")
    return open_checked(real, st, where)


class SafetensorsReader:
    """One open safetensors file, read with positioned reads and a byte counter.

    `pattern="sequential"` (the base model: read whole, in file order) or `"random"` (the
    other model: read a few pages here and there, so the kernel must not read ahead).
    `bytes_read` counts every byte asked of the file, the header included. `label` names
    the model in errors ("BASE"); with `folder`, the file must resolve inside that folder
    (see input_files)."""

    def __init__(self, path: str | os.PathLike, pattern: str = "sequential", *,
                 label: str = "", folder: str | os.PathLike | None = None):
        self.path = Path(path)
        self.where = f"{label} {self.path}" if label else str(self.path)
        self.fd = open_weight_file(self.path, None if folder is None else Path(folder), label)
        self.bytes_read = 0
        self.tensors: dict[str, TensorInfo] = {}
        self._starts: list[int] = []
        self._lock = threading.Lock()
        try:
            self.size = os.fstat(self.fd).st_size
            if hasattr(os, "posix_fadvise"):  # not on every platform (macOS)
                advice = (os.POSIX_FADV_RANDOM if pattern == "random"
                          else os.POSIX_FADV_SEQUENTIAL)
                os.posix_fadvise(self.fd, 0, 0, advice)
            if self.size < 8:
                raise CheckpointError(f"{self.where}: truncated: {self.size} bytes, expected "
                                      "a safetensors file (8-byte header length, JSON header, "
                                      "data)")
            n = int.from_bytes(self.pread(8, 0), "little")
            if n > MAX_HEADER or 8 + n > self.size:
                raise CheckpointError(f"{self.where}: corrupt or truncated: header length {n} "
                                      f"does not fit the file's {self.size} bytes (nor the "
                                      f"format's limit of {MAX_HEADER}); expected a "
                                      "safetensors file")
            self.header_bytes = self.pread(n, 8)
            self.tensors, self.metadata = parse_header(self.path, self.header_bytes, self.size,
                                                       label)
            self._starts = [i.offset for i in self.tensors.values()]
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _what(self, offset: int) -> str:
        """'tensor NAME' for the tensor whose bytes hold `offset`, or 'the header'."""
        k = bisect.bisect_right(self._starts, offset) - 1
        if k < 0:
            return "the header"
        return f"tensor {list(self.tensors)[k]!r}"

    def _read_error(self, offset: int, wanted: int, got: int | OSError) -> CheckpointError:
        if isinstance(got, OSError):
            return CheckpointError(f"{self.where}: cannot read {self._what(offset)} at offset "
                                   f"{offset}: {got.strerror}")
        return CheckpointError(f"{self.where}: truncated while reading {self._what(offset)}: "
                               f"wanted {wanted} bytes at offset {offset}, got {got}; "
                               "expected the file as its header describes (was it changed "
                               "or truncated during the merge?)")

    def pread(self, n: int, offset: int) -> bytes:
        """Exactly n bytes at offset, or CheckpointError (the file shrank under us)."""
        try:
            data = os.pread(self.fd, n, offset)
        except OSError as err:
            raise self._read_error(offset, n, err) from None
        self.bytes_read += len(data)
        if len(data) != n:
            raise self._read_error(offset, n, len(data))
        return data

    def _pread_into(self, view: memoryview, offset: int) -> None:
        """Fill `view` with its length in bytes from offset (thread-safe)."""
        done = 0
        while done < len(view):
            try:
                got = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as err:
                raise self._read_error(offset, len(view), err) from None
            if got <= 0:
                raise self._read_error(offset, len(view), done)
            done += got
        with self._lock:
            self.bytes_read += done

    def read_into(self, buf: torch.Tensor, offset: int) -> None:
        """Fill the contiguous CPU tensor `buf` with its size in bytes from offset."""
        self._pread_into(memoryview(buf.view(-1).view(torch.uint8).numpy()), offset)

    def read_tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor `name` (a new CPU tensor, or written into `out`: contiguous,
        same dtype and element count)."""
        info = self.tensors[name]
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            self.read_into(out, info.offset)
        return out

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of tensor `name` (row-major flat indices) in one
        positioned read: a new 1-D CPU tensor of the tensor's dtype."""
        info = self.tensors[name]
        if not 0 <= start <= stop <= info.numel:
            raise CheckpointError(f"{self.path}: tensor {name!r}: internal: elements "
                                  f"[{start}, {stop}) asked of {info.numel}")
        out = torch.empty(stop - start, dtype=info.dtype)
        if out.numel():
            self.read_into(out, info.offset + start * info.itemsize)
        return out

    def read_elements(self, name: str, flat_idx: torch.Tensor) -> torch.Tensor:
        """The elements of tensor `name` at sorted row-major flat indices, reading only the
        pages that hold them (consecutive pages in one read). Returns a 1-D tensor of the
        tensor's dtype."""
        info = self.tensors[name]
        if flat_idx.numel() == 0:
            return torch.empty(0, dtype=info.dtype)
        size = info.itemsize
        first = info.offset + flat_idx.to(torch.int64) * size  # absolute byte of each element
        # Page-aligned runs covering [first, first + size): an element may straddle pages.
        p0, p1 = first // PAGE, (first + size - 1) // PAGE
        pages = torch.unique(torch.cat([p0, p1]))  # sorted
        breaks = torch.nonzero(pages[1:] != pages[:-1] + 1).flatten() + 1
        starts = torch.cat([pages[:1], pages[breaks]])
        ends = torch.cat([pages[breaks - 1], pages[-1:]]) + 1  # exclusive
        run_start = (starts * PAGE).clamp(min=info.offset)  # within this tensor's bytes
        run_end = (ends * PAGE).clamp(max=info.offset + info.nbytes)
        lengths = run_end - run_start
        # Read every run into one buffer (several reads in flight: a disk serves a queue of
        # small random reads faster than one at a time); map each element's bytes there.
        buf = torch.empty(int(lengths.sum()), dtype=torch.uint8)
        view = memoryview(buf.numpy())
        offsets = (torch.cumsum(lengths, 0) - lengths).tolist()
        jobs = list(zip(run_start.tolist(), lengths.tolist(), offsets))

        def read_runs(part: list[tuple[int, int, int]]) -> None:
            for s, n, pos in part:
                self._pread_into(view[pos:pos + n], s)

        if len(jobs) < 4 * READERS:
            read_runs(jobs)
        else:
            with ThreadPoolExecutor(READERS, thread_name_prefix="modkern-pread") as pool:
                list(pool.map(read_runs, [jobs[k::READERS] for k in range(READERS)]))
        buf_start = torch.cumsum(lengths, 0) - lengths  # where each run begins in buf
        run_of = torch.searchsorted(run_start, first, right=True) - 1
        local = first - run_start[run_of] + buf_start[run_of]
        byte_idx = local.unsqueeze(1) + torch.arange(size)
        return buf[byte_idx.flatten()].view(info.dtype)
