"""`modkern generate`: decode prompts from the mixture of two local checkpoints,
alpha * p(MODEL) + (1 - alpha) * p(OTHER), token by token (both models share MODEL's
tokenizer; where their vocabularies differ in width, the common prefix is used)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CheckpointError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="decode with a mixture of two models' distributions",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, metavar="DIR",
                   help="model 1: a local Hugging Face checkpoint folder (its tokenizer is used)")
    p.add_argument("--other", required=True, type=Path, metavar="DIR",
                   help="model 2: a local Hugging Face checkpoint folder")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of model 1 in [0, 1]; 1 decodes model 1 alone, 0 model 2 "
                   "alone (default 0.5)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="a prompt; repeat the option to decode several prompts as one batch")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate per prompt at most (default 64)")
    p.add_argument("--sample", action="store_true",
                   help="sample from the mixture instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature, with --sample (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass, with --sample (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0,
                   help="keep the k most likely tokens, with --sample (default 0: off)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for --sample (default: not seeded)")
    p.add_argument("--device", default=None,
                   help="torch device for both models (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight dtype: auto keeps the checkpoints' own (default auto)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="engine for the mixture op (default auto: triton on CUDA)")
    p.set_defaults(command="generate")


def _load(path: Path, role: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{role} {str(path)!r} is not a checkpoint folder "
                              "(no config.json found there)")
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    return model.to(device).eval()


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from ..decoding.generation import generate

    from ..checks import check_alpha  # imports torch: not at --help time
    alpha = check_alpha(args.alpha, "--alpha")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model1 = _load(args.model, "--model", device, args.dtype)
    model2 = _load(args.other, "--other", device, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    texts = generate(model1, model2, tokenizer, args.prompt, alpha,
                     max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     seed=args.seed, backend=args.backend)
    for prompt, text in zip(args.prompt, texts):
        if len(args.prompt) > 1:
            print(f"--- {prompt!r}")
        sys.stdout.write(prompt + text + "\n")
    return 0
