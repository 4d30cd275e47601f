"""`modkern generate`: decode prompts from the mixture of two local checkpoints,
alpha * p(MODEL) + (1 - alpha) * p(OTHER), token by token (both models share MODEL's
tokenizer; where their vocabularies differ in width, the common prefix is used)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import CheckpointError
from .arguments import real_number, seed, subcommand, whole_number

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "generate", "decode with a mixture of two models' distributions",
                   __doc__)
    p.add_argument("--model", required=True, type=Path, metavar="DIR",
                   help="model 1: a local Hugging Face checkpoint folder (its tokenizer is used)")
    p.add_argument("--other", required=True, type=Path, metavar="DIR",
                   help="model 2: a local Hugging Face checkpoint folder")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of model 1 in [0, 1]; 1 decodes model 1 alone, 0 model 2 "
                   "alone (default 0.5)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="a prompt; repeat the option to decode several prompts as one batch")
    p.add_argument("--max-new-tokens", type=whole_number(1), default=64,
                   help="tokens to generate per prompt at most (default 64)")
    p.add_argument("--sample", action="store_true",
                   help="sample from the mixture instead of greedy decoding")
    p.add_argument("--temperature", type=real_number(0.0, 1e6, True), default=1.0,
                   help="sampling temperature > 0, with --sample (default 1.0)")
    p.add_argument("--top-p", type=real_number(0.0, 1.0, True), default=1.0,
                   help="nucleus sampling mass in (0, 1], with --sample (default 1.0: off)")
    p.add_argument("--top-k", type=whole_number(0), default=0,
                   help="keep the k most likely tokens, with --sample (default 0: off)")
    p.add_argument("--seed", type=seed, default=None,
                   help="random seed for --sample (default: not seeded)")
    p.add_argument("--device", default=None,
                   help="torch device for both models: cpu, cuda or cuda:N (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight dtype: auto keeps the checkpoints' own (default auto)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="engine for the mixture op (default auto: triton on CUDA)")
    p.set_defaults(command="generate")


def check_model_folder(path: Path, role: str) -> None:
    """A model folder as `modkern merge` checks its inputs, before transformers reads it:
    readable; weight files, index and side files regular files inside the folder (or its
    Hugging Face cache blob store); safetensors headers valid; config.json a JSON object."""
    from ..checkpoint.folder import INDEX, SINGLE, Checkpoint, check_folder, read_config
    from ..checkpoint.input_files import check_input_file

    check_folder(path, role)
    if read_config(path, role) == {}:
        raise CheckpointError(f"{role} {path}: no config.json (or an empty one); expected a "
                              "Hugging Face checkpoint folder")
    if os.path.lexists(path / SINGLE) or os.path.lexists(path / INDEX):
        Checkpoint(path, role).close()  # also checks the side files
    for entry in sorted(os.listdir(path)):
        if entry.endswith((".safetensors", ".json", ".bin", ".model", ".txt", ".jinja")):
            check_input_file(path, entry, role)


def _load(path: Path, role: str, device, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True,
            dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    except Exception as err:  # noqa: BLE001 - see _tokenizer
        raise CheckpointError(f"{role} {path}: transformers cannot load it: "
                              f"{type(err).__name__}: {_first_line(err)}") from None
    return model.to(device).eval()


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        # transformers reports a folder it cannot load in many types (OSError, ValueError,
        # KeyError on a malformed tokenizer.json, the tokenizers library's own Exception):
        # at this boundary they all mean the folder; the type is kept in the message.
        raise CheckpointError(f"--model {path}: transformers cannot load its tokenizer: "
                              f"{type(err).__name__}: {_first_line(err)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise CheckpointError(f"--model {path}: the tokenizer has neither a pad nor an "
                              "end-of-sequence token; expected one to pad prompts with")
    return tokenizer


def run(args: argparse.Namespace) -> int:
    import torch

    from transformers.utils import logging as transformers_logging

    from ..checkpoint.options import parse_device
    from ..checks import check_alpha  # imports torch: not at --help time
    from ..decoding.generation import generate
    from ..errors import BackendError
    from . import printable

    transformers_logging.set_verbosity_error()  # its warnings are not this command's output
    alpha = check_alpha(args.alpha, "--alpha")
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"--device {args.device}: no CUDA device is available here; use "
                           "--device cpu")
    check_model_folder(args.model, "--model")
    check_model_folder(args.other, "--other")
    tokenizer = _tokenizer(args.model)
    for prompt in args.prompt:
        if not tokenizer(prompt)["input_ids"]:
            raise CheckpointError(f"--prompt {prompt!r}: encodes to no token; expected some "
                                  "text")
    model1 = _load(args.model, "--model", device, args.dtype)
    model2 = _load(args.other, "--other", device, args.dtype)
    texts = generate(model1, model2, tokenizer, args.prompt, alpha,
                     max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     seed=args.seed, backend=args.backend)
    for prompt, text in zip(args.prompt, texts):
        if len(args.prompt) > 1:
            print(f"--- {prompt!r}")
        sys.stdout.write(printable(prompt + text) + "\n")
    return 0
