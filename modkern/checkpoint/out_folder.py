"""The output folder of a checkpoint merge: where it may go, the disk space it needs, and
the files copied into it from BASE beside the weights.

OUT is resolved and checked before any work: its parent must be (or be creatable in) a
writable folder, it must not be a symlink or a mount point, and it must neither be, contain
nor lie inside an input, nor hold the real files of an input that reach it through
symlinks (replacing it with --force would destroy that input's data).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from .folder import SIDE_FILES, read_config
from .input_files import file_kind, open_input
from .publish import output_error
from .report import format_bytes

# Files copied from BASE into the output, beside the weights (top level only).
COPIED = SIDE_FILES


def out_path(out: str | os.PathLike) -> Path:
    """OUT as a merge uses it: absolute, with `..` and symlinked parent folders resolved
    (`new/x/..` is `new`). CheckpointError when OUT itself is a symlink: name its target."""
    given = Path(out).absolute()
    if given.name in ("", ".", ".."):
        return Path(os.path.realpath(given))
    real = Path(os.path.realpath(given.parent)) / given.name
    if os.path.islink(real):
        target = os.readlink(real)
        state = "" if os.path.exists(real) else "dangling "
        raise CheckpointError(f"OUT {out}: is a {state}symlink (to {target}); expected the "
                              "folder's own path, not a link to it")
    return real


def check_out_path(base: Path, other: Path, out: Path, force: bool) -> None:
    """check_out_folder for a merge of the resolved folders BASE and OTHER."""
    check_out_folder(out, {"BASE": base, "OTHER": other}, force)


def check_out_folder(out: Path, inputs: Mapping[str, Path], force: bool) -> None:
    """Everything about OUT (resolved, see out_path) that can go wrong, checked before any
    work: the input folders (resolved, by label), the parent folder, an existing OUT."""
    outside = "both inputs" if len(inputs) == 2 else "every input"
    for label, src in inputs.items():
        if out == src or src in out.parents:
            raise CheckpointError(f"OUT {out}: is {'the' if out == src else 'inside'} {label} "
                                  f"folder {src}; expected a folder outside {outside}")
        if out in src.parents:
            raise CheckpointError(f"OUT {out}: contains {label} folder {src}; expected a "
                                  f"folder outside {outside}")
        _check_links_into(src, label, out)
    check_parent(out)
    _check_name_length(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise CheckpointError(f"OUT {out}: already exists; expected a new folder (pass "
                                  "--force / force=True to replace it)")
        if not out.is_dir():
            raise CheckpointError(f"OUT {out}: exists and is not a folder; expected a folder "
                                  "(remove it yourself)")
        if os.path.ismount(out):
            raise CheckpointError(f"OUT {out}: is a mount point; expected a folder that can be "
                                  "replaced (give a folder inside it)")
        if not os.access(out, os.W_OK | os.X_OK):  # renaming a folder updates its `..`
            raise CheckpointError(f"OUT {out}: is not writable, so it cannot be replaced; "
                                  "expected a folder this process may write")


def _check_links_into(src: Path, label: str, out: Path) -> None:
    """An input whose files are symlinks into OUT (or into a folder OUT contains, such as a
    Hugging Face cache blob store) would lose them when OUT is replaced."""
    try:
        entries = [e for e in os.scandir(src) if e.is_symlink()]
    except OSError:
        return  # reported, with its reason, when the checkpoint is opened
    for entry in entries:
        real = Path(os.path.realpath(entry.path))
        if real == out or out in real.parents:
            raise CheckpointError(f"OUT {out}: {label} file {entry.path} links into it (to "
                                  f"{real}); expected a folder that holds no input's files")


def _check_name_length(out: Path) -> None:
    """A name or path the filesystem refuses would fail only at publication."""
    probe = out.parent
    while not os.path.lexists(probe):
        probe = probe.parent
    try:
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    longest = max(out.parts, key=lambda p: len(os.fsencode(p)))
    if len(os.fsencode(longest)) > name_max:
        raise CheckpointError(f"OUT {out}: the name {longest[:40]!r}... has "
                              f"{len(os.fsencode(longest))} bytes; expected at most {name_max} "
                              "(the filesystem's limit)")
    if len(os.fsencode(str(out))) + 40 > path_max:  # room for the temporary folder's name
        raise CheckpointError(f"OUT {str(out)[:40]!r}...: the path has "
                              f"{len(os.fsencode(str(out)))} bytes; expected a shorter path "
                              f"(the filesystem's limit is {path_max})")


def check_parent(out: Path, label: str = "OUT") -> None:
    """CheckpointError unless the folder `out` can be created: its nearest existing
    ancestor is a folder this process may write (`label` names `out` in the message)."""
    probe = out.parent
    while not os.path.lexists(probe):
        probe = probe.parent
    try:
        mode = os.stat(probe).st_mode
    except OSError as err:
        raise CheckpointError(f"{label} {out}: cannot access {probe}: {err.strerror}; expected "
                              f"a writable folder to create {label} in") from None
    if not stat.S_ISDIR(mode):
        what = "a file" if stat.S_ISREG(mode) else file_kind(mode)
        raise CheckpointError(f"{label} {out}: {probe} is {what}; expected a folder to create "
                              f"{label} in")
    if not os.access(probe, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(probe).f_flag & getattr(os, "ST_RDONLY", 1))
        why = "is on a read-only filesystem" if read_only else "is not writable"
        raise CheckpointError(f"{label} {out}: {probe} {why}; expected a writable folder to "
                              f"create {label} in")


def make_parent(out: Path) -> None:
    """Create OUT's parent folders (checked by check_out_path); a failure (a full inode
    table, a race) is a CheckpointError naming OUT."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(Path(err.filename or out.parent), err, "create the folder") \
            from None


def check_space(out: Path, needed: int) -> None:
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise CheckpointError(f"OUT {out}: not enough disk space: the merge writes "
                              f"{format_bytes(needed)} but {probe} has {format_bytes(free)} "
                              "free; expected at least that much free")


def copy_base_files(base: Path, tmp: Path, copied: list[str],
                    out_dtype: torch.dtype | None) -> None:
    """Copy BASE's side files `copied` into `tmp`, each read under the input-file rule
    (input_files) again; config.json gets the output dtype when `out_dtype` is given."""
    for name in copied:
        dst = tmp / name
        if name == "config.json" and out_dtype is not None:
            config = read_config(base, "BASE")
            dtype_name = str(out_dtype).removeprefix("torch.")
            keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            for k in keys:
                config[k] = dtype_name
            write_file(dst, [(json.dumps(config, indent=2) + "\n").encode()])
            continue
        fd = open_input(base, name, "BASE")
        if fd is None:
            raise CheckpointError(f"BASE {base / name}: disappeared during the merge; expected "
                                  "the input folder unchanged")
        try:
            write_file(dst, _blocks(fd, f"BASE {base / name}"))
        finally:
            os.close(fd)


def _blocks(fd: int, where: str):
    while True:
        try:
            block = os.read(fd, 1 << 20)
        except OSError as err:
            raise CheckpointError(f"{where}: cannot read: {err.strerror}") from None
        if not block:
            return
        yield block


def write_file(dst: Path, blocks) -> None:
    """Create the new file `dst` from an iterable of bytes; a failed create or write is a
    CheckpointError naming OUT, the file and the reason (ENOSPC: disk or inodes full)."""
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o666)
    except OSError as err:
        raise output_error(dst, err, "create") from None
    try:
        for block in blocks:
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view):]
    except OSError as err:
        os.close(fd)
        raise output_error(dst, err, "write") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.close(fd)
    except OSError as err:
        raise output_error(dst, err, "write") from None
