"""Hostile input folders: files that are not what they claim (symlinks out of the folder,
FIFOs, devices, directories, loops) and weight files, indexes and configs whose content is
malformed in every way a JSON or safetensors reader can trip on."""

from __future__ import annotations

import json
import os

from hostile_cases import (Env, case, first_shard, merge_case, mknod_char, outside_file,
                           raw_safetensors, replace_header, set_index)

# ---- 1. side files and weight files that point elsewhere ----------------------------------


@case("security", "tokenizer-symlink-to-proc-environ")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "tokenizer.json", "environ",
                                            "outside the folder", "expected a regular file"))
    (base / "tokenizer.json").unlink()
    os.symlink("/proc/self/environ", base / "tokenizer.json")
    return c


@case("security", "config-symlink-to-outside-file")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "config.json", "secret.txt", "outside"))
    secret = outside_file(env)
    (base / "config.json").unlink()
    os.symlink(secret, base / "config.json")
    return c


@case("security", "tokenizer-model-relative-symlink-out")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "tokenizer.model", "secret.txt"))
    outside_file(env)
    os.symlink("../secret.txt", base / "tokenizer.model")
    return c


@case("security", "other-side-file-symlink-out")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "special_tokens_map.json", "outside"))
    os.symlink(outside_file(env), other / "special_tokens_map.json")
    return c


@case("security", "side-file-symlink-to-dev-zero")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "vocab.txt", "/dev/zero", "outside"))
    os.symlink("/dev/zero", base / "vocab.txt")
    return c


@case("security", "side-file-fifo")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "merges.txt", "FIFO", "expected a regular"))
    os.mkfifo(base / "merges.txt")
    return c


@case("security", "side-file-directory")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "tokenizer_config.json", "a directory"))
    (base / "tokenizer_config.json").mkdir()
    return c


@case("security", "side-file-char-device")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "added_tokens.json", "character device"))
    mknod_char(base / "added_tokens.json")
    return c


@case("security", "side-file-dangling-symlink")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "generation_config.json", "dangling"))
    (base / "generation_config.json").unlink()
    os.symlink("gone.json", base / "generation_config.json")
    return c


@case("security", "side-file-symlink-loop")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "vocab.json", "symlink loop"))
    os.symlink("vocab.json", base / "vocab.json")
    return c


@case("security", "side-file-symlink-to-fifo-inside")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "chat_template.jinja", "FIFO",
                                            "through the symlink"))
    (base / "sub").mkdir()
    os.mkfifo(base / "sub" / "pipe")
    os.symlink("sub/pipe", base / "chat_template.jinja")
    return c


@case("security", "weights-symlink-out-of-base")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "model.safetensors", "stolen.safetensors",
                                            "outside"))
    os.replace(base / "model.safetensors", env.tmp / "stolen.safetensors")
    os.symlink(env.tmp / "stolen.safetensors", base / "model.safetensors")
    return c


@case("security", "shard-symlink-out-of-other")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "model-00001-of-00002", "outside"))
    shard = first_shard(other)
    os.replace(shard, env.tmp / "elsewhere.safetensors")
    os.symlink(env.tmp / "elsewhere.safetensors", shard)
    return c


@case("security", "index-symlink-out-of-other")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "model.safetensors.index.json",
                                             "outside"))
    index = other / "model.safetensors.index.json"
    os.replace(index, env.tmp / "index.json")
    os.symlink(env.tmp / "index.json", index)
    return c


@case("security", "shard-symlink-to-dev-zero")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "model-00002-of-00002", "/dev/zero"))
    shard = sorted(other.glob("model-*.safetensors"))[1]
    shard.unlink()
    os.symlink("/dev/zero", shard)
    return c


# ---- 5. weight files that are not files: say what they are --------------------------------


@case("messages", "model-safetensors-fifo")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "model.safetensors", "FIFO",
                                            "expected a regular file"))
    (base / "model.safetensors").unlink()
    os.mkfifo(base / "model.safetensors")
    return c


@case("messages", "model-safetensors-directory")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "model.safetensors", "a directory"))
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").mkdir()
    return c


@case("messages", "model-safetensors-device")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "model.safetensors", "character device"))
    (base / "model.safetensors").unlink()
    mknod_char(base / "model.safetensors")
    return c


@case("messages", "shard-fifo")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "model-00001-of-00002", "FIFO"))
    shard = first_shard(other)
    shard.unlink()
    os.mkfifo(shard)
    return c


@case("messages", "shard-directory")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "model-00001-of-00002", "a directory"))
    shard = first_shard(other)
    shard.unlink()
    shard.mkdir()
    return c


@case("messages", "shard-missing")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "model-00001-of-00002", "missing",
                                             "tensor '"))
    first_shard(other).unlink()
    return c


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


@case("content", "config-is-a-number")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "config.json", "a JSON int",
                                            "expected a JSON object"))
    (base / "config.json").write_text("42")
    return c


@case("content", "config-is-a-string")
def _(env: Env):
    c, _, other, _ = merge_case(env, expect=("OTHER", "config.json", "a JSON str"))
    (other / "config.json").write_text('"Qwen2"')
    return c


@case("content", "config-is-a-list")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "config.json", "a JSON list"))
    (base / "config.json").write_text('[{"model_type": "toy"}]')
    return c


@case("content", "config-nested-deep")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "config.json", "nested too deeply"))
    (base / "config.json").write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    return c


@case("content", "config-duplicated-key")
def _(env: Env):
    c, base, _, _ = merge_case(env, expect=("BASE", "config.json", "'hidden_size' appears"))
    (base / "config.json").write_text('{"hidden_size": 16, "hidden_size": 32}')
    return c


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
