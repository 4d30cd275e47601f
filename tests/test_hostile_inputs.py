"""The hostile-input catalogue (hostile_cases*.py) run against the `modkern` commands.

Every case must end with exit code 2 and exactly one stderr line `modkern CMD: error: ...`
holding the case's fragments (the file or key, and what was expected); no traceback; no OUT
(or the previous OUT untouched); no temporary folder beside OUT; the inputs unchanged.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import hostile_cases_inputs  # noqa: F401  (registers its cases)
import hostile_cases_options  # noqa: F401
import hostile_cases_output  # noqa: F401
import pytest
from _checkpoints import ROOT
from hostile_cases import CASES, Case, Env

from modkern.cli import main


def snapshot(path: Path):
    """Everything about a path that a command must not change (symlinks not followed)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:  # a name too long to exist
        assert err.errno == errno.ENAMETOOLONG, err
        return None
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", st.st_mode, {n: snapshot(path / n) for n in sorted(os.listdir(path))})
    if stat.S_ISREG(st.st_mode):
        return ("file", st.st_mode, path.read_bytes())
    return ("other", st.st_mode, st.st_rdev)


def state(c: Case) -> dict:
    paths = list(c.inputs) + ([c.out] if c.out is not None else [])
    return {str(p): snapshot(Path(p)) for p in paths}


def leftovers(c: Case) -> list[str]:
    if c.out is None or not Path(c.out).parent.is_dir():
        return []
    return [p.name for p in Path(c.out).parent.iterdir() if ".modkern-tmp-" in p.name]


def check(name: str, c: Case, rc, err: str, before: dict) -> None:
    lines = err.splitlines()
    assert "Traceback" not in err, f"{name}: traceback\n{err}"
    assert rc == 2, f"{name}: exit code {rc}\n{err}"
    assert len(lines) == 1, f"{name}: {len(lines)} stderr lines\n{err}"
    # (argparse reports an unknown option as the top-level `modkern: error: ...`)
    assert re.match(rf"modkern( {c.argv[0]})?: error: ", lines[0]), lines[0]
    for fragment in c.expect:
        assert fragment in lines[0], f"{name}: {fragment!r} not in {lines[0]!r}"
    assert state(c) == before, f"{name}: an input or the previous OUT changed"
    assert not leftovers(c), f"{name}: left {leftovers(c)}"


def run_main(argv: list[str]):
    try:
        return main(argv)
    except SystemExit as done:  # argparse's own errors
        return done.code


@pytest.fixture
def mount(tmp_path):
    """Mount small tmpfs folders (root only; the case is skipped where that is refused)."""
    mounted: list[Path] = []

    def do(size: str = "1m", nr_inodes: int | None = None, ro: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes else "") + \
            (",ro" if ro else "")
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "modkern-test", str(point)],
                               capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
        mounted.append(point)
        return point

    yield do
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


IN_PROCESS = sorted(n for n, (how, _) in CASES.items() if how != "unprivileged")
UNPRIVILEGED = sorted(n for n, (how, _) in CASES.items() if how == "unprivileged")


@pytest.mark.parametrize("name", IN_PROCESS)
def test_hostile_input(name, tmp_path, capsys, monkeypatch, mount):
    how, build = CASES[name]
    c = build(Env(tmp_path, mount if how == "tmpfs" else None, monkeypatch))
    before = state(c)
    rc = run_main(c.argv)
    check(name, c, rc, capsys.readouterr().err, before)


_DRIVER = r"""
import contextlib, io, json, sys
from modkern.cli import main
results = {}
for name, argv in json.load(open(sys.argv[1])).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as done:
            rc = done.code
    results[name] = [rc, err.getvalue()]
json.dump(results, open(sys.argv[2], "w"))
"""


def _without_root_override() -> None:
    """In the child: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
    that root after exec obeys file permissions like any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture(scope="module")
def unprivileged_runs(tmp_path_factory):
    """Every "unprivileged" case built, then run in one subprocess that cannot override
    file permissions (root drops the capabilities; another user has none)."""
    root = tmp_path_factory.mktemp("unprivileged")
    built = {}
    for name in UNPRIVILEGED:
        folder = root / name.replace("/", "-")
        folder.mkdir()
        c = CASES[name][1](Env(folder))
        built[name] = (c, state(c))
    (root / "argv.json").write_text(json.dumps({n: c.argv for n, (c, _) in built.items()}))
    (root / "driver.py").write_text(_DRIVER)
    try:
        subprocess.run([sys.executable, str(root / "driver.py"), str(root / "argv.json"),
                        str(root / "results.json")], cwd=ROOT, check=True, timeout=300,
                       preexec_fn=_without_root_override if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as err:
        pytest.skip(f"cannot run without permission override here: {err}")
    results = json.loads((root / "results.json").read_text())
    return {n: (c, before, *results[n]) for n, (c, before) in built.items()}


@pytest.mark.parametrize("name", UNPRIVILEGED)
def test_hostile_input_unprivileged(name, unprivileged_runs):
    c, before, rc, err = unprivileged_runs[name]
    check(name, c, rc, err, before)


def test_catalogue_covers_every_kind():
    kinds = {n.split("/")[0] for n in CASES}
    assert kinds >= {"security", "content", "messages", "out", "disk", "unreadable",
                     "options", "generate", "demo"}
    assert len(CASES) >= 90


@pytest.mark.parametrize("raised, code, line", [
    (OSError(errno.EIO, "Input/output error", "/x/y"), 2,
     "modkern merge: error: /x/y: Input/output error (EIO)"),
    (MemoryError(), 2, "modkern merge: error: out of memory (MemoryError"),
    # torch's CPU allocator, e.g. for a tensor a header claims is 2 TB
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                  "2199023255552 bytes. Error code 12 (Cannot allocate memory)"), 2,
     "modkern merge: error: out of memory (RuntimeError: DefaultCPUAllocator"),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate"),
     2, "modkern merge: error: out of memory (OutOfMemoryError: CUDA out of memory"),
    (RuntimeError("some other torch failure"), 1,
     "modkern merge: internal error: RuntimeError: some other torch failure"),
    (KeyboardInterrupt(), 130, "modkern merge: interrupted"),
    (TypeError("a bug\nwith two lines"), 1, "modkern merge: internal error: TypeError: a bug"
     "\\nwith two lines (a bug in modkern"),
])
def test_how_the_command_line_ends(monkeypatch, capsys, raised, code, line):
    """Bad input and failing systems: one line, exit 2. A bug: its traceback and a line that
    names its type, exit 1 (never folded into a bare one-line error)."""
    import modkern.cli.merge as merge_cli

    def fail(args):
        raise raised

    monkeypatch.setattr(merge_cli, "run", fail)
    assert run_main(["merge", "a", "b", "c", "--alpha", "0.9"]) == code
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(line), err
    assert ("Traceback" in err) == (code == 1)
    if code != 1:
        assert len(err.splitlines()) == 1


def test_the_api_raises_checkpoint_error_on_a_full_disk(tmp_path, monkeypatch):
    from modkern.checkpoint.merge import merge_checkpoints
    from modkern.errors import CheckpointError

    c = CASES["disk/enospc-injected-writer"][1](Env(tmp_path, None, monkeypatch))
    base, other, out = c.argv[1:4]
    with pytest.raises(CheckpointError, match="ENOSPC"):
        merge_checkpoints(base, other, out, 0.9, max_shard_size="100KB", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "other"]
