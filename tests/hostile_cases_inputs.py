"""Hostile input folders: files that are not what they claim (symlinks out of the folder,
FIFOs, devices, directories, loops) and weight files, indexes and configs whose content is
malformed in every way a JSON or safetensors reader can trip on."""

from __future__ import annotations

import json
import os

from hostile_cases import (Case, Env, case, first_shard, merge_case, mknod_char, outside_file,
                           raw_safetensors, replace_header, set_index, table)

# ---- 1. side files and weight files that point elsewhere ----------------------------------


@case("security", "side-file-symlink-to-fifo-inside")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "chat_template.jinja", "FIFO",
                                            "through the symlink"))
    (base / "sub").mkdir()
    os.mkfifo(base / "sub" / "pipe")
    os.symlink("sub/pipe", base / "chat_template.jinja")
    return c


def _link_out(env: Env, model: str, file: str, target: str, expect: tuple[str, ...]) -> Case:
    """BASE's or OTHER's `file` made a symlink to `target`: a path, "secret" (a file
    outside the folder; "../secret.txt" links to it relatively) or "moved" (the real file,
    moved out of the folder)."""
    c, base, other, _ = merge_case(env, expect=(model.upper(), *expect, "outside the folder"))
    folder = base if model == "base" else other
    shards, which = sorted(folder.glob("model-*.safetensors")), ("first shard", "second shard")
    path = shards[which.index(file)] if file in which else folder / file
    if target == "moved":
        target = str(env.tmp / f"moved-{path.name}")
        os.replace(path, target)
    elif target in ("secret", "../secret.txt"):
        secret = outside_file(env)
        target = str(secret) if target == "secret" else target
    path.unlink(missing_ok=True)
    os.symlink(target, path)
    return c


table("security", _link_out, [
    ("tokenizer-symlink-to-proc-environ", "base", "tokenizer.json", "/proc/self/environ",
     ("tokenizer.json", "environ", "expected a regular file")),
    ("config-symlink-to-outside-file", "base", "config.json", "secret", ("secret.txt",)),
    ("tokenizer-model-relative-symlink-out", "base", "tokenizer.model", "../secret.txt",
     ("tokenizer.model", "secret.txt")),
    ("other-side-file-symlink-out", "other", "special_tokens_map.json", "secret",
     ("special_tokens_map.json",)),
    ("side-file-symlink-to-dev-zero", "base", "vocab.txt", "/dev/zero", ("/dev/zero",)),
    ("weights-symlink-out-of-base", "base", "model.safetensors", "moved",
     ("model.safetensors", "moved-model.safetensors")),
    ("shard-symlink-out-of-other", "other", "first shard", "moved", ("model-00001-of-00002",)),
    ("index-symlink-out-of-other", "other", "model.safetensors.index.json", "moved",
     ("moved-model.safetensors.index.json",)),
    ("shard-symlink-to-dev-zero", "other", "second shard", "/dev/zero",
     ("model-00002-of-00002", "/dev/zero")),
])


# ---- 5. weight files that are not files: say what they are --------------------------------


def _not_a_file(env: Env, model: str, file: str, what: str, expect: tuple[str, ...]) -> Case:
    """BASE's or OTHER's `file` ("first shard": OTHER's first) replaced by `what`: a fifo,
    dir, device, dangling link, self-link (loop), or nothing."""
    c, base, other, _ = merge_case(env, expect=(model.upper(), *expect))
    folder = base if model == "base" else other
    path = first_shard(folder) if file == "first shard" else folder / file
    path.unlink(missing_ok=True)
    {"fifo": os.mkfifo, "dir": os.mkdir, "device": mknod_char, "missing": lambda p: None,
     "dangling": lambda p: os.symlink("gone.json", p),
     "loop": lambda p: os.symlink(p.name, p)}[what](path)
    return c


table("security", _not_a_file, [
    ("side-file-fifo", "base", "merges.txt", "fifo", ("merges.txt", "FIFO",
                                                      "expected a regular")),
    ("side-file-directory", "base", "tokenizer_config.json", "dir", ("a directory",)),
    ("side-file-char-device", "base", "added_tokens.json", "device", ("character device",)),
    ("side-file-dangling-symlink", "base", "generation_config.json", "dangling",
     ("generation_config.json", "dangling")),
    ("side-file-symlink-loop", "base", "vocab.json", "loop", ("vocab.json", "symlink loop")),
])
table("messages", _not_a_file, [
    ("model-safetensors-fifo", "base", "model.safetensors", "fifo",
     ("model.safetensors", "FIFO", "expected a regular file")),
    ("model-safetensors-directory", "base", "model.safetensors", "dir", ("a directory",)),
    ("model-safetensors-device", "base", "model.safetensors", "device",
     ("character device",)),
    ("shard-fifo", "other", "first shard", "fifo", ("model-00001-of-00002", "FIFO")),
    ("shard-directory", "other", "first shard", "dir", ("model-00001-of-00002",
                                                        "a directory")),
    ("shard-missing", "other", "first shard", "missing", ("model-00001-of-00002", "missing",
                                                          "tensor '")),
])



@case("messages", "truncated-names-model-file-tensor")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "model.safetensors", "truncated",
                                            "tensor 'c.bias'", "expected a complete"))
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    return c


@case("messages", "input-folder-is-a-fifo")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("OTHER", "FIFO", "expected a checkpoint folder"))
    fifo = env.tmp / "fifo"
    os.mkfifo(fifo)
    c.argv[2] = str(fifo)
    return c


# ---- 2. content a JSON or safetensors reader trips on -------------------------------------


@case("content", "header-nested-200k-deep")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "model.safetensors", "nested too deeply"))
    deep = b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    raw_safetensors(base / "model.safetensors", deep)
    return c


@case("content", "index-nested-200k-deep")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "index.json", "nested too deeply"))
    set_index(other, '{"weight_map": ' + "{\"a\": " * 200_000 + "1" + "}" * 200_001)
    return c


@case("content", "header-integer-of-5000-digits")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "model.safetensors", "4300 digits"))
    replace_header(base / "model.safetensors", lambda h: json.dumps(h).replace(
        '"data_offsets": [0', '"data_offsets": [' + "1" * 5000, 1).encode())
    return c


@case("content", "index-integer-of-5000-digits")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "index.json", "4300 digits"))
    set_index(other, '{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}')
    return c


@case("content", "shape-with-a-bool")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "tensor 'b.weight'", "[True, 16]",
                                            "non-negative whole numbers"))
    replace_header(base / "model.safetensors",
                   lambda h: h | {"b.weight": h["b.weight"] | {"shape": [True, 16]}})
    return c


@case("content", "empty-tensor-whose-strides-overflow")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "tensor 'z'", "too large"))
    def edit(h):
        end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
        return h | {"z": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [end, end]}}
    replace_header(base / "model.safetensors", edit)
    return c


@case("content", "negative-offset")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "tensor 'a.weight'", "data_offsets",
                                            "0 <= begin <= end"))
    replace_header(base / "model.safetensors", lambda h: h | {"a.weight": h["a.weight"] | {
        "data_offsets": [-512, 0]}})
    return c


@case("content", "huge-header-length-field")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "model.safetensors", "header length",
                                            "expected a safetensors file"))
    raw_safetensors(base / "model.safetensors", b"{}", length=2**64 - 1)
    return c


@case("content", "duplicated-key-in-header")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "'a.weight' appears twice"))
    replace_header(base / "model.safetensors", lambda h: json.dumps(h).replace(
        '"b.weight"', '"a.weight"', 1).encode())
    return c


@case("content", "duplicated-key-in-index")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "index.json", "'weight_map' appears "
                                             "twice"))
    index = other / "model.safetensors.index.json"
    text = index.read_text()
    set_index(other, text[:-1] + ', "weight_map": {}}')
    return c


@case("content", "nan-in-header")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "model.safetensors", "NaN"))
    replace_header(base / "model.safetensors", lambda h: json.dumps(h).replace(
        '"shape": [16]', '"shape": [NaN]', 1).encode())
    return c


@case("content", "infinity-in-index")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "index.json", "Infinity"))
    set_index(other, '{"metadata": {"total_size": Infinity}, "weight_map": {"a": "b"}}')
    return c


@case("content", "index-names-one-shard-twice")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "the same file", "expected each shard"))
    index = json.loads((other / "model.safetensors.index.json").read_text())
    shard = first_shard(other)
    os.symlink(shard.name, other / "alias.safetensors")
    name = next(k for k, v in index["weight_map"].items() if v == shard.name)
    index["weight_map"][name] = "alias.safetensors"
    set_index(other, json.dumps(index))
    return c


@case("content", "index-empty-weight-map")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "weight_map is empty"))
    set_index(other, '{"weight_map": {}}')
    return c


@case("content", "index-shard-path-escapes")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "'../x.safetensors'", "not a file name"))
    set_index(other, json.dumps({"weight_map": {"a.weight": "../x.safetensors"}}))
    return c


@case("content", "index-shard-name-with-newline")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "missing", "\\n"))
    index = json.loads((other / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v.replace("-of-", "-\n-of-") for k, v in
                           index["weight_map"].items()}
    set_index(other, json.dumps(index))
    return c


@case("content", "metadata-not-an-object")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "__metadata__", "object of strings"))
    replace_header(base / "model.safetensors", lambda h: h | {"__metadata__": 5})
    return c


@case("content", "dtype-is-a-list")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "tensor 'c.bias'", "unknown dtype"))
    replace_header(base / "model.safetensors",
                   lambda h: h | {"c.bias": h["c.bias"] | {"dtype": ["F32"]}})
    return c


@case("content", "header-entry-not-an-object")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "tensor 'c.bias'", "corrupt header entry"))
    replace_header(base / "model.safetensors", lambda h: h | {"c.bias": "F32"})
    return c


@case("content", "weights-hold-no-tensor")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "hold no tensor"))
    raw_safetensors(base / "model.safetensors", b'{"__metadata__": {"format": "pt"}}')
    return c


@case("content", "header-not-utf8")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "model.safetensors", "not valid JSON"))
    raw_safetensors(base / "model.safetensors", b'{"\xff\xfe": 1}')
    return c


def _config(env: Env, model: str, text: str, expect: tuple[str, ...]) -> Case:
    c, base, other, _ = merge_case(env, expect=(model.upper(), "config.json", *expect))
    ((base if model == "base" else other) / "config.json").write_text(text)
    return c


table("content", _config, [
    ("config-is-a-number", "base", "42", ("a JSON int", "expected a JSON object")),
    ("config-is-a-string", "other", '"Qwen2"', ("a JSON str",)),
    ("config-is-a-list", "base", '[{"model_type": "toy"}]', ("a JSON list",)),
    ("config-nested-deep", "base", '{"a": ' + "[" * 200_000 + "]" * 200_000 + "}",
     ("nested too deeply",)),
    ("config-duplicated-key", "base", '{"hidden_size": 16, "hidden_size": 32}',
     ("'hidden_size' appears",)),
])


@case("content", "config-not-json-with-dtype-cast")
def _(env: Env):
    c, base, _, _ = merge_case(env, "--dtype", "float32",
                               expect=("BASE", "config.json", "not valid JSON"))
    (base / "config.json").write_bytes(b"\x00\x01binary")
    return c


@case("content", "index-naming-30000-missing-shards")
def _(env: Env):
    """Checked in one pass (a scan per shard would take minutes)."""
    c, _, other, _ = merge_case(env, expect=("OTHER", "s00000.safetensors", "missing"))
    set_index(other, json.dumps({"weight_map": {f"t{i}": f"s{i:05d}.safetensors"
                                                for i in range(30_000)}}))
    return c
