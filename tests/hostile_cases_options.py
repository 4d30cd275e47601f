"""Hostile options: command-line values, recipe and config files of the wrong type or not
text at all, and the inputs of `modkern generate` and `modkern demo`."""

from __future__ import annotations

import json
import os

import torch
from hostile_cases import Case, Env, case, merge_case, outside_file, table, toy, toy_tensors
from safetensors.torch import save_file

# ---- merge options ----------------------------------------------------------------------

def _merge_option(env: Env, options: list[str], expect: tuple[str, ...]) -> Case:
    return merge_case(env, *options, expect=expect)[0]


table("options", _merge_option, [
    ("device-xyz", ["--device", "xyz"], ("device 'xyz'", "expected 'cpu'")),
    ("device-cuda-abc", ["--device", "cuda:abc"], ("device 'cuda:abc'", "cuda:N")),
    ("dtype-int8", ["--dtype", "int8"], ("dtype 'int8'", "floating-point")),
    ("max-shard-size-words", ["--max-shard-size", "lots"], ("max shard size 'lots'",)),
])


@case("options", "alpha-not-a-number")
def _(env: Env):
    c = merge_case(env, expect=("--alpha 'abc'", "expected a number"))[0]
    c.argv[-1] = "abc"
    return c


@case("options", "option-without-value")
def _(env: Env):
    return Case(["merge", "--alpha"], ("argument --alpha", "expected one argument", "--help"))


@case("options", "unknown-option")
def _(env: Env):
    return Case(["merge", "--bogus"], ("unrecognized arguments: --bogus",))


@case("options", "base-path-with-newline")
def _(env: Env):
    c, _, _, _ = merge_case(env, expect=("BASE", "a\\nb", "no such folder"))
    c.argv[1] = str(env.tmp / "a\nb")
    return c


def _recipe_case(env: Env, content: str | bytes, *expect: str) -> Case:
    c, _, _, _ = merge_case(env, expect=("recipe", *expect))
    recipe = env.tmp / "recipe.yaml"
    (recipe.write_bytes if isinstance(content, bytes) else recipe.write_text)(content)
    c.argv = c.argv[:4] + ["--recipe", str(recipe)]
    c.inputs += (recipe,)
    return c


@case("options", "recipe-include-is-a-number")
def _(env: Env):
    return _recipe_case(env, "alpha: 0.9\ninclude: 5\n", "include must be", "got 5")


@case("options", "recipe-alpha-with-integer-keys")
def _(env: Env):
    return _recipe_case(env, "alpha: {1: 0.5}\n", "alpha must be", "{1: 0.5}")


@case("options", "recipe-strict-is-a-string")
def _(env: Env):
    return _recipe_case(env, "alpha: 0.9\nstrict: 'yes'\n", "strict must be true or false")


@case("options", "recipe-precision-is-a-list")
def _(env: Env):
    return _recipe_case(env, "alpha: 0.9\nprecision: [exact]\n", "precision must be")


@case("options", "recipe-binary")
def _(env: Env):
    return _recipe_case(env, bytes(range(256)) * 4, "not UTF-8")


@case("options", "recipe-yaml-error")
def _(env: Env):
    return _recipe_case(env, "alpha: [0.9\ninclude: mlp\n", "not YAML/JSON", "line 2")


@case("options", "recipe-nested-deep")
def _(env: Env):
    return _recipe_case(env, "alpha: " + "[" * 100_000 + "]" * 100_000 + "\n",
                        "nested too deeply")


@case("options", "recipe-integer-of-5000-digits")
def _(env: Env):
    return _recipe_case(env, "alpha: " + "7" * 5000 + "\n", "not YAML/JSON", "digits")


@case("options", "recipe-is-a-list")
def _(env: Env):
    return _recipe_case(env, "- alpha\n- 0.9\n", "expected a mapping", "got list")


@case("options", "recipe-dev-zero")
def _(env: Env):
    c, _, _, _ = merge_case(env, expect=("recipe", "/dev/zero", "larger than"))
    c.argv = c.argv[:4] + ["--recipe", "/dev/zero"]
    return c


@case("options", "paper-config-binary")
def _(env: Env):
    c, _, _, out = merge_case(env, expect=("config", "not UTF-8"))
    cfg = env.tmp / "mod.yml"
    cfg.write_bytes(b"\xff\xfe\x00base_model")
    c.argv = ["merge", "--config", str(cfg), str(out)]
    return c


@case("options", "paper-config-weights-of-bools")
def _(env: Env):
    c, base, other, out = merge_case(env, expect=("config", "weights entry", "True"))
    cfg = env.tmp / "mod.yml"
    cfg.write_text(json.dumps({"experts": [{"source_model": str(base)},
                                           {"source_model": str(other)}],
                               "weights": [True, False]}))
    c.argv = ["merge", "--config", str(cfg), str(out)]
    return c


# ---- vocabularies of different widths (--vocab) ---------------------------------------------

def _padded_case(env: Env, *extra: str, expect: tuple[str, ...], other_rows: int = 8,
                 config_vocab: tuple[int, int] | None = None) -> Case:
    """BASE's a.weight has 10 rows (a padded vocabulary), OTHER's `other_rows`."""
    base = toy(env.tmp / "base", 0, rows=10)
    other = toy(env.tmp / "other", 1, 2, rows=other_rows)
    for folder, vocab in zip((base, other), config_vocab or ()):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"vocab_size": vocab}))
    out = env.tmp / "out"
    return Case(["merge", str(base), str(other), str(out), "--alpha", "0.9", *extra], expect,
                (base, other), out)


@case("options", "vocab-rows-differ-without-the-option")
def _(env: Env):
    return _padded_case(env, expect=("'a.weight'", "shapes differ", "[10, 16]", "[8, 16]",
                                      "--vocab common"))


@case("options", "vocab-size-differs-without-the-option")
def _(env: Env):
    return _padded_case(env, expect=("config.json", "vocab_size differs", "10", "8",
                                      "--vocab common"), config_vocab=(10, 8))


@case("options", "vocab-common-but-columns-differ")
def _(env: Env):
    c = _padded_case(env, "--vocab", "common", expect=("'b.weight'", "shapes differ",
                                                       "[16, 16]", "[16, 15]"))
    other = c.inputs[1]
    sd = {"a.weight": toy_tensors(1)["a.weight"], "b.weight": torch.zeros(16, 15),
          "c.bias": torch.zeros(16)}
    for f in other.glob("*.safetensors"):
        f.unlink()
    (other / "model.safetensors.index.json").unlink()
    save_file(sd, str(other / "model.safetensors"))
    return c


@case("options", "vocab-bogus")
def _(env: Env):
    return merge_case(env, "--vocab", "padded", expect=("--vocab", "invalid choice",
                                                        "'padded'"))[0]


@case("options", "recipe-vocab-is-a-number")
def _(env: Env):
    return _recipe_case(env, "alpha: 0.9\nvocab: 5\n", "vocab must be", "'common'")


@case("options", "recipe-vocab-bogus")
def _(env: Env):
    return _recipe_case(env, "alpha: 0.9\nvocab: padded\n", "vocab must be", "'padded'")


# ---- modkern generate ----------------------------------------------------------------------

def _generate(env: Env, *extra: str, expect: tuple[str, ...]) -> tuple[Case, object, object]:
    model, other = toy(env.tmp / "model", 0), toy(env.tmp / "other", 1)
    argv = ["generate", "--model", str(model), "--other", str(other), "--prompt", "w1", *extra]
    return Case(argv, expect, (model, other)), model, other


@case("generate", "model-missing")
def _(env: Env):
    c, model, _ = _generate(env, expect=("--model", "nope", "no such folder"))
    c.argv[2] = str(env.tmp / "nope")
    return c


@case("generate", "device-xyz")
def _(env: Env):
    return _generate(env, "--device", "xyz", expect=("device 'xyz'",))[0]


@case("generate", "tokenizer-symlink-out")
def _(env: Env):
    c, model, _ = _generate(env, expect=("--model", "tokenizer.json", "outside"))
    (model / "tokenizer.json").unlink()
    os.symlink(outside_file(env), model / "tokenizer.json")
    return c


@case("generate", "other-weights-fifo")
def _(env: Env):
    c, _, other = _generate(env, expect=("--other", "model.safetensors", "FIFO"))
    (other / "model.safetensors").unlink()
    os.mkfifo(other / "model.safetensors")
    return c


@case("generate", "config-is-a-list")
def _(env: Env):
    c, model, _ = _generate(env, expect=("--model", "config.json", "a JSON list"))
    (model / "config.json").write_text("[]")
    return c


@case("generate", "not-a-model-transformers-knows")
def _(env: Env):
    return _generate(env, expect=("--model", "transformers cannot load"))[0]


def _generate_option(env: Env, options: list[str], expect: tuple[str, ...]) -> Case:
    return _generate(env, *options, expect=expect)[0]


table("generate", _generate_option, [
    ("max-new-tokens-0", ["--max-new-tokens", "0"], ("--max-new-tokens", ">= 1")),
    ("top-p-2", ["--top-p", "2"], ("--top-p", "(0, 1]")),
    ("temperature-nan", ["--temperature", "nan"], ("--temperature",)),
    ("seed-huge", ["--seed", str(2**70)], ("--seed",)),
])


# ---- modkern demo --------------------------------------------------------------------------


@case("demo", "out-under-a-file")
def _(env: Env):
    (env.tmp / "afile").write_text("x")
    return Case(["demo", "--quick", "--out", str(env.tmp / "afile" / "demo")],
                ("--out", "afile", "is a file"), (env.tmp / "afile",))


@case("demo", "out-is-a-file")
def _(env: Env):
    (env.tmp / "afile").write_text("x")
    return Case(["demo", "--quick", "--out", str(env.tmp / "afile")],
                ("--out", "afile", "not an earlier demo"), (env.tmp / "afile",))


@case("demo", "threads-huge")
def _(env: Env):
    return Case(["demo", "--threads", str(10**8)], ("--threads", "<= 1024"))


@case("demo", "seed-huge")
def _(env: Env):
    return Case(["demo", "--seed", str(2**64)], ("--seed",))


@case("demo", "alphas-nan")
def _(env: Env):
    return Case(["demo", "--quick", "--alphas", "0.5,nan", "--out", str(env.tmp / "d")],
                ("--alphas", "nan"))


@case("demo", "out-not-writable", "unprivileged")
def _(env: Env):
    (env.tmp / "locked").mkdir(mode=0o555)
    return Case(["demo", "--quick", "--out", str(env.tmp / "locked" / "demo")],
                ("--out", "not writable"), (env.tmp / "locked",))
