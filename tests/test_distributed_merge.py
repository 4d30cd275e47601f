"""The distributed checkpoint merge run as a user runs it: `torchrun -m modkern merge` with 2
and 3 processes on the gloo backend (CPU). Every output file must be byte-identical to the
single-process merge's (so every tensor, split ones included, is bit-identical); a rank
that fails or is killed mid-merge must fail the whole merge, leave no OUT and no temporary
folder, and end every process (timeouts here catch a hang)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _checkpoints import ROOT, ckpts, load_folder, padded, run_cli  # noqa: F401

from modkern.checkpoint.merge import merge_checkpoints
from modkern.checkpoint.job import open_merge
from modkern.checkpoint.options import MergeOptions
from modkern.checkpoint.distributed import DistributedMergeError, Part, assign
from modkern.checkpoint.ranks import agreed_error as _agreed_error
from modkern.errors import NonFiniteError
from modkern.merging.state_dict import merge_state_dicts
from modkern.checkpoint.shard_writer import PlannedTensor

TIMEOUT = 180  # seconds: a hung rank fails the test instead of blocking it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m modkern merge ...` on a free local port."""
    import os
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("MODKERN_TEST_WRITE_DELAY", "MODKERN_TEST_DIST_FAIL")}
    full_env |= {"OMP_NUM_THREADS": "1"} | (env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "modkern",
           "merge", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _weights(folder: Path) -> dict[str, bytes]:
    """The weight files and index, byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name.endswith((".safetensors", ".index.json"))}


def _modkern_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("modkern merge")]


# --- the work assignment -------------------------------------------------------------

def test_assign_balances_bytes_and_covers_every_tensor_once():
    sizes = [900, 100, 500, 500, 300, 300, 200, 50, 50, 5000]
    planned = [PlannedTensor(f"t{i}", torch.float32, (n // 4 * 4 // 4,))
               for i, n in enumerate(sizes)]
    for world in (1, 2, 3):
        parts = assign(planned, world, split_above=4000)
        assert parts == assign(planned, world, split_above=4000)  # deterministic
        rows: dict[str, list[tuple[int, int]]] = {}
        for rank_parts in parts:
            order = [int(p.name[1:]) for p in rank_parts]
            assert order == sorted(order)  # file order within a rank
            for p in rank_parts:
                rows.setdefault(p.name, []).append(p.rows)
        assert set(rows) == {t.name for t in planned}
        big = planned[-1]
        if world == 1:
            assert all(r == [None] for r in rows.values())
        else:  # the one tensor above split_above: one contiguous row block per rank
            assert sorted(rows[big.name]) == [(big.shape[0] * r // world,
                                               big.shape[0] * (r + 1) // world)
                                              for r in range(world)]
            assert all(r == [None] for n, r in rows.items() if n != big.name)
            loads = [sum(next(t.nbytes for t in planned if t.name == p.name)
                         for p in rank_parts if p.rows is None) for rank_parts in parts]
            assert max(loads) - min(loads) <= max(t.nbytes for t in planned[:-1])


def test_assign_gives_empty_blocks_when_fewer_rows_than_ranks():
    parts = assign([PlannedTensor("w", torch.bfloat16, (2, 1000))], 3, split_above=10)
    assert [p for rank_parts in parts for p in rank_parts] == [
        Part("w", (0, 0)), Part("w", (0, 1)), Part("w", (1, 2))]


# --- bit-identical to one process ----------------------------------------------------

CASES = {
    # Llama pair, every tensor above 10 KB split by rows (embeddings, MLP, lm_head), the
    # attention projections whole: both kinds of work on every rank.
    "llama-split": ("llama_a", "llama_b", ["--alpha", "0.9"], 10000, None),
    # Qwen pair (OTHER sharded), several output shards, reference arithmetic, a filter, a
    # dtype cast (so copied tensors are cast too), per-layer alpha, split tensors.
    "qwen-shards": ("qwen_a", "qwen_b", ["--alpha", "layers.0.*=0.6", "--alpha", "0.85",
                                         "--include", "mlp", "--include", "embed",
                                         "--precision", "reference", "--dtype", "float32",
                                         "--max-shard-size", "60KB"], 20000, "float32"),
}


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_to_single_process(ckpts, tmp_path, nproc, case):
    base_name, other_name, options, split_above, dtype = CASES[case]
    base, other = ckpts[base_name], ckpts[other_name]
    single, multi = tmp_path / "single", tmp_path / "multi"
    r1 = run_cli("merge", base, other, single, *options)
    assert r1.returncode == 0, r1.stderr
    r = torchrun(nproc, base, other, multi, *options, "--split-above", split_above)
    assert r.returncode == 0, r.stderr
    # Some tensors really were split, and each rank had some whole ones.
    with open_merge(base, other, tmp_path / "plan", MergeOptions(0.9, dtype=dtype)) as job:
        parts = assign(job.planned, nproc, split_above)
    assert all(any(p.rows for p in ps) and any(p.rows is None for p in ps) for ps in parts)
    assert _weights(multi) == _weights(single)
    if case == "qwen-shards":
        assert (multi / "model.safetensors.index.json").exists()
    # The rest of the folder: same files; config, tokenizer and card as one process writes.
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    for name in ("config.json", "README.md"):
        assert (multi / name).read_bytes() == (single / name).read_bytes()
    # One summary line, from rank 0, with the same totals.
    lines = _modkern_lines(r.stdout)
    assert len(lines) == 1 and _modkern_lines(r1.stdout)[0].split("; read")[0] == \
        lines[0].split("; read")[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "single"]


def test_equals_merge_state_dicts(ckpts, tmp_path):
    """Independently of the single-process merge: the loaded state dicts, merged in memory
    (every tensor split, 1-D ones too; an existing OUT replaced with --force)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("replaced by --force")
    r = torchrun(2, ckpts["llama_a"], ckpts["llama_b"], out, "--alpha", "0.8",
                 "--split-above", "1", "--distributed", "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "previous.txt").exists()
    expected = merge_state_dicts(load_folder(ckpts["llama_a"]), load_folder(ckpts["llama_b"]),
                                 0.8)
    got = load_folder(out)
    assert set(got) == set(expected)
    for k, t in expected.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def test_vocab_common_with_padded_rows_split_over_ranks(ckpts, tmp_path):
    """--vocab common, every tensor split by rows over 3 ranks: the padded embed_tokens and
    lm_head (200 rows, 128 common) give one rank a block across the boundary and one a
    block of BASE's extra rows only. Byte for byte the single-process merge."""
    base = padded(ckpts["llama_a"], tmp_path / "padded", 200)
    options = ["--alpha", "0.8", "--vocab", "common", "--quiet"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    r1 = run_cli("merge", base, ckpts["llama_b"], single, *options)
    assert r1.returncode == 0, r1.stderr
    r = torchrun(3, base, ckpts["llama_b"], multi, *options, "--split-above", "1")
    assert r.returncode == 0, r.stderr
    assert _weights(multi) == _weights(single)
    got, sd1 = load_folder(multi), load_folder(base)
    assert torch.equal(got["lm_head.weight"][128:], sd1["lm_head.weight"][128:])


_API = """
import json, os, sys, modkern
r = modkern.merge_checkpoints_distributed(sys.argv[1], sys.argv[2], sys.argv[3], 0.9,
                                          split_above=10000, progress=True)
with open(os.path.join(sys.argv[4], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({"merged": r.tensors_merged, "copied": r.tensors_copied,
               "elements": r.elements_merged, "taken": r.elements_taken,
               "by_key": r.taken_by_key, "written": r.bytes_written}, f)
"""


def test_python_api_returns_totals_on_every_rank(ckpts, tmp_path):
    script, results = tmp_path / "merge.py", tmp_path / "results"
    script.write_text(_API)
    results.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script),
                        ckpts["llama_a"], ckpts["llama_b"], tmp_path / "out", results],
                       cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert "modkern merge (rank 0 of 2)" in r.stderr and "rank 1 of" not in r.stderr
    got = [json.loads((results / f"rank{k}.json").read_text()) for k in (0, 1)]
    single = merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], tmp_path / "single", 0.9,
                               progress=False)
    want = {"merged": single.tensors_merged, "copied": single.tensors_copied,
            "elements": single.elements_merged, "taken": single.elements_taken,
            "by_key": single.taken_by_key, "written": single.bytes_written}
    assert got == [want, want]
    assert list(got[0]["by_key"]) == list(single.taken_by_key)  # BASE's order


_TRITON_API = """
import sys, modkern
modkern.merge_checkpoints_distributed(sys.argv[1], sys.argv[2], sys.argv[3], 0.8,
                                      split_above=10000, backend="triton", progress=False)
"""


def test_triton_route_on_two_ranks_is_bit_identical(ckpts, tmp_path):
    """Each rank's selects on the Triton engine (under the interpreter here), split tensors
    (row blocks, min and max reduced over the ranks) and whole ones: the same bytes as one
    process on the torch engine."""
    pytest.importorskip("triton", reason="triton is not installed")
    script = tmp_path / "merge.py"
    script.write_text(_TRITON_API)
    with open_merge(ckpts["llama_a"], ckpts["llama_b"], tmp_path / "plan",
                    MergeOptions(0.8)) as job:
        parts = assign(job.planned, 2, 10000)
    assert all(any(p.rows for p in ps) and any(p.rows is None for p in ps) for ps in parts)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script),
                        ckpts["llama_a"], ckpts["llama_b"], tmp_path / "multi"],
                       cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr
    merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], tmp_path / "single", 0.8,
                      backend="torch", progress=False)
    assert _weights(tmp_path / "multi") == _weights(tmp_path / "single")


# --- failures ------------------------------------------------------------------------

def _assert_nothing_left(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not list(tmp_path.glob(f".{out.name}.modkern-tmp-*")), list(tmp_path.iterdir())


@pytest.mark.parametrize("nproc, how", [(2, "raise"), (3, "kill")])
def test_failing_rank_fails_the_merge(ckpts, tmp_path, nproc, how):
    out = tmp_path / "out"
    r = torchrun(nproc, ckpts["llama_a"], ckpts["llama_b"], out, "--alpha", "0.9",
                 "--split-above", "10000", env={"MODKERN_TEST_DIST_FAIL": f"1:{how}"})
    assert r.returncode != 0
    errors = _modkern_lines(r.stderr)
    if how == "raise":  # the failing rank's one line, printed once
        assert errors == ["modkern merge: error: rank 1: test failure injected by "
                          "MODKERN_TEST_DIST_FAIL"], r.stderr
    else:  # a killed rank says nothing: the survivors say they lost it, or, when torchrun
        # (which ends the other workers when one dies) got to them first, were interrupted
        assert errors, r.stderr
        assert all("lost contact with the other ranks" in e or e.endswith("interrupted")
                   for e in errors), r.stderr
    _assert_nothing_left(tmp_path, out)


def test_killed_rank_0_leaves_no_out(ckpts, tmp_path):
    """Rank 0 owns the temporary folder: killed, it cannot remove it (as a killed single
    process cannot); OUT is absent and the next merge into OUT removes the leftover."""
    out = tmp_path / "out"
    r = torchrun(2, ckpts["llama_a"], ckpts["llama_b"], out, "--alpha", "0.9",
                 env={"MODKERN_TEST_DIST_FAIL": "0:kill"})
    assert r.returncode != 0 and not out.exists()
    r = run_cli("merge", ckpts["llama_a"], ckpts["llama_b"], out, "--alpha", "0.9")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stuck_rank_times_out(ckpts, tmp_path):
    """Rank 1 stops after its first tensor: rank 0 gives up after --dist-timeout, says so,
    and torchrun ends the stuck rank; nothing is written."""
    out = tmp_path / "out"
    start = time.monotonic()
    r = torchrun(2, ckpts["llama_a"], ckpts["llama_b"], out, "--alpha", "0.9",
                 "--dist-timeout", "4", env={"MODKERN_TEST_DIST_FAIL": "1:hang"})
    assert r.returncode != 0
    assert time.monotonic() - start < 90
    errors = _modkern_lines(r.stderr)
    assert any(e.startswith("modkern merge: error: rank 0: lost contact") for e in errors), \
        r.stderr
    _assert_nothing_left(tmp_path, out)


def test_bad_weights_in_a_split_block_name_tensor_and_index(tmp_path):
    """A NaN in rank 1's rows of a split tensor: that rank's error (the same message as one
    process gives, with its rank) ends every rank; nothing is written."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    base, other = tmp_path / "base", tmp_path / "other"
    for folder in (base, other):
        folder.mkdir()
        sd = {"a.weight": torch.randn(64, 32, generator=g), "b.weight": torch.randn(8, 8,
                                                                                    generator=g)}
        if folder is base:
            sd["a.weight"][50, 3] = float("nan")  # rows 32..63 are rank 1's
        save_file(sd, folder / "model.safetensors")
    with pytest.raises(NonFiniteError) as single:
        merge_checkpoints(base, other, tmp_path / "single", 0.9, progress=False)
    out = tmp_path / "out"
    r = torchrun(2, base, other, out, "--alpha", "0.9", "--split-above", "1000")
    assert r.returncode != 0
    assert _modkern_lines(r.stderr) == [f"modkern merge: error: rank 1: {single.value}"]
    assert "flat index 1603" in r.stderr
    _assert_nothing_left(tmp_path, out)


def test_agreed_error_keeps_the_failing_rank_class():
    err = _agreed_error("rank 1: bad", 1, "NonFiniteError")
    assert isinstance(err, NonFiniteError) and isinstance(err, DistributedMergeError)
    assert err.rank == 1 and str(err) == "rank 1: bad"
    assert type(_agreed_error("x", 0, "OSError")) is DistributedMergeError
    assert type(_agreed_error("x", 0, "CheckpointError")) is DistributedMergeError


def test_distributed_flag_needs_torchrun(ckpts, tmp_path):
    r = run_cli("merge", ckpts["qwen_a"], ckpts["qwen_b"], tmp_path / "out", "--alpha", "0.9",
                "--distributed", env={"RANK": "", "WORLD_SIZE": ""})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "torchrun --nproc-per-node" in lines[0], r.stderr
    r = run_cli("merge", ckpts["qwen_a"], ckpts["qwen_b"], tmp_path / "out", "--alpha", "0.9",
                "--split-above", "1MB")
    assert r.returncode == 2 and "distributed merge only" in r.stderr
    assert list(tmp_path.iterdir()) == []
    r = run_cli("merge", "--help")
    assert all(opt in r.stdout for opt in ("--distributed", "--split-above", "--dist-timeout"))
