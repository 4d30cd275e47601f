"""The input-file rule (modkern/checkpoint/input_files.py): what an input folder may hold
and how its files are opened, beyond the one-line errors of the catalogue
(test_hostile_inputs.py): the Hugging Face cache layout that must keep working, hardlinks,
a file swapped between the check and the open, a file truncated while a merge reads it,
and side files checked before any output is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hostile_cases import first_shard, toy

import modkern.checkpoint.input_files as input_files
import modkern.checkpoint.publish as publish
from modkern.checkpoint.folder import Checkpoint
from modkern.checkpoint.merge import merge_checkpoints
from modkern.checkpoint.safetensors_io import SafetensorsReader
from modkern.errors import CheckpointError


def hf_snapshot(root: Path, seed: int) -> Path:
    """A checkpoint laid out as huggingface_hub caches it: files of
    models--org--name/snapshots/<rev>/ are relative symlinks to ../../blobs/<hash>."""
    repo = root / "hub" / f"models--org--toy{seed}"
    snap = toy(repo / "snapshots" / "0123abcd", seed)
    (repo / "blobs").mkdir()
    for f in sorted(snap.iterdir()):
        blob = f"{seed:02d}{abs(hash(f.name)):016x}"
        os.replace(f, repo / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", f)
    return snap


def test_hugging_face_cache_snapshots_merge(tmp_path):
    base, other = hf_snapshot(tmp_path, 0), hf_snapshot(tmp_path, 1)
    out = tmp_path / "out"
    merge_checkpoints(base, other, out, 0.9, progress=False)
    assert (out / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    assert not (out / "tokenizer.json").is_symlink()


def test_snapshot_file_linking_to_another_repos_blobs_is_refused(tmp_path):
    base, other = hf_snapshot(tmp_path, 0), hf_snapshot(tmp_path, 1)
    stolen = sorted((other.parents[1] / "blobs").iterdir())[0]
    (base / "tokenizer.json").unlink()
    os.symlink(os.path.relpath(stolen, base), base / "tokenizer.json")
    with pytest.raises(CheckpointError, match="outside the folder"):
        merge_checkpoints(base, other, tmp_path / "out", 0.9, progress=False)


def test_snapshot_file_linking_below_the_blob_store_is_refused(tmp_path):
    """Exactly blobs/<hash>: not a folder inside it, not the store's parent."""
    base = hf_snapshot(tmp_path, 0)
    blobs = base.parents[1] / "blobs"
    (blobs / "sub").mkdir()
    (blobs / "sub" / "x").write_text("{}")
    os.symlink("../../blobs/sub/x", base / "vocab.json")
    with pytest.raises(CheckpointError, match="vocab.json.*outside"):
        Checkpoint(base, "BASE")


def test_a_hardlink_is_the_file_itself(tmp_path):
    """A hardlink cannot be told from the file it is (and the kernel lets only the owner of
    a file, or someone who may read and write it, create one): it is read like any file."""
    base, other = toy(tmp_path / "base", 0), toy(tmp_path / "other", 1)
    shared = tmp_path / "elsewhere.json"
    shared.write_text('{"chat": 1}')
    os.link(shared, base / "chat_template.json")
    merge_checkpoints(base, other, tmp_path / "out", 0.9, progress=False)
    assert (tmp_path / "out" / "chat_template.json").read_text() == '{"chat": 1}'


def test_a_swap_between_check_and_open_is_caught(tmp_path):
    folder = toy(tmp_path / "base", 0)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN")
    checked = input_files.check_input_file(folder, "tokenizer.json", "BASE")
    (folder / "tokenizer.json").unlink()
    os.symlink(secret, folder / "tokenizer.json")  # the attacker's swap
    with pytest.raises(CheckpointError, match="changed while it was being opened"):
        input_files.open_checked(*checked, "BASE tokenizer.json")


def test_a_swapped_parent_folder_is_caught(tmp_path):
    """The final component is opened without following links; a folder above it swapped
    for a symlink is caught by comparing the open file with the one checked."""
    folder = toy(tmp_path / "base", 0)
    (folder / "sub").mkdir()
    (folder / "sub" / "t.json").write_text("{}")
    (folder / "tokenizer.json").unlink()
    os.symlink("sub/t.json", folder / "tokenizer.json")
    checked = input_files.check_input_file(folder, "tokenizer.json", "BASE")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "t.json").write_text('{"secret": 1}')
    os.rename(folder / "sub", tmp_path / "old-sub")
    os.symlink(tmp_path / "evil", folder / "sub")
    with pytest.raises(CheckpointError, match="changed while"):
        input_files.open_checked(*checked, "BASE tokenizer.json")


def test_truncated_while_reading_names_model_file_and_tensor(tmp_path):
    folder = toy(tmp_path / "other", 1, shards=2)
    with Checkpoint(folder, "OTHER", "random") as ck:
        name = ck.names()[-1]
        reader = ck.where[name]
        os.truncate(reader.path, ck.info(name).offset + 4)
        with pytest.raises(CheckpointError) as err:
            reader.read_tensor(name)
    msg = str(err.value)
    assert msg.startswith(f"OTHER {reader.path}: truncated while reading tensor {name!r}")
    assert "expected the file as its header describes" in msg


def test_truncated_during_a_merge_is_one_error(tmp_path, monkeypatch):
    """OTHER's shard loses its end after the headers were checked (another process
    rewriting it): the merge fails naming OTHER, the file and the tensor; nothing is left."""
    base, other = toy(tmp_path / "base", 0), toy(tmp_path / "other", 1, shards=2)
    victim = first_shard(other)
    original = SafetensorsReader.__init__

    def init_then_truncate(self, path, *a, **kw):
        original(self, path, *a, **kw)
        if Path(path) == victim:
            os.truncate(victim, self.size - 8)

    monkeypatch.setattr(SafetensorsReader, "__init__", init_then_truncate)
    with pytest.raises(CheckpointError, match=rf"OTHER {victim}: truncated while reading "
                                              r"tensor '"):
        merge_checkpoints(base, other, tmp_path / "out", 0.0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "other"]


def test_side_files_are_checked_before_any_output(tmp_path, monkeypatch):
    """An unopenable side file fails the merge before the temporary folder exists (not
    after the weights were written)."""
    base, other = toy(tmp_path / "base", 0), toy(tmp_path / "other", 1)
    real_open = input_files.open_checked

    def refuse_generation_config(real, st, where):
        if real.name == "generation_config.json":
            raise CheckpointError(f"{where}: cannot open: Permission denied")
        return real_open(real, st, where)

    monkeypatch.setattr(input_files, "open_checked", refuse_generation_config)
    monkeypatch.setattr(publish, "temp_folder", lambda out: pytest.fail("merge started"))
    with pytest.raises(CheckpointError, match="generation_config.json: cannot open"):
        merge_checkpoints(base, other, tmp_path / "out", 0.9, progress=False)


def test_parse_json_refuses_what_readers_disagree_on():
    for raw, why in ((b'{"a": 1, "a": 2}', "appears twice"), (b"[NaN]", "NaN"),
                     (b"[" * 100_000, "nested too deeply"), (b"\xff", "not UTF-8"),
                     (b"1" * 5000, "digits"), (b"{", "line 1")):
        with pytest.raises(CheckpointError, match=why):
            input_files.parse_json(raw, "X", "Y", allow_nan=False)
    assert input_files.parse_json(b'{"a": NaN}', "X", "Y")["a"] != 0
    assert input_files.parse_json(json.dumps({"k": [1, 2]}), "X", "Y") == {"k": [1, 2]}
