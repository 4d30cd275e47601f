"""`modkern demo`: MoD end to end on the CPU in about a minute, nothing downloaded.

Builds a tiny Qwen2 model with a character-level tokenizer, pretrains it briefly on copying
strings (the base), fine-tunes two copies, one on digit addition ("57+8=65") and one on
string reversal ("abcd=dcba"), and saves them as Hugging Face checkpoints. Then merges the
two by MoD weight select and by a linear average at several alphas, decodes with the
mixture of both specialists' distributions at the same alphas, distils the base from that
mixture (0.5 / 0.5) on both tasks' training prompts, and prints one table: each
model's exact-match accuracy on held-out prompts of both tasks, with the elements each MoD
merge took from specialist B and the bytes it read. Alpha for the MoD merge and for mixture
decoding is also chosen by a sweep (validation log-likelihood on prompts kept apart from
the test prompts) and scored beside the others. The checkpoints, results.json, table.txt,
accuracy.png (accuracy against alpha), sweep.txt and sweep.png (the sweep's tables and
plot) are written to --out.

Seeds are fixed: the same options and --threads give the same table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from ..errors import CheckpointError
from .arguments import add_count, number_list, seed, subcommand, whole_number

QUICK_ENV = "MODKERN_DEMO_QUICK"
# Bounds on the counts: far above any useful run, below what exhausts threads or memory.
MAX_THREADS = 1024
MAX_COUNT = 10**6  # the demo builds its data in memory


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "demo", "train two tiny specialists, merge them by MoD, compare",
                   __doc__)
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="folder for the checkpoints, results.json, table.txt, "
                   "accuracy.png, sweep.txt and sweep.png (default: a new temporary folder); "
                   "an existing folder must be empty or hold an earlier demo's output, which "
                   "is replaced")
    p.add_argument("--quick", action="store_true",
                   help=f"reduced run for CI: fewer steps, examples and alphas, a few "
                   f"seconds (also when the environment sets {QUICK_ENV}=1)")
    p.add_argument("--alphas", type=number_list("0.1,0.5,0.9"), default=None,
                   metavar="A,B,...",
                   help="alphas for the merges and the mixture, comma-separated, each in "
                   "[0, 1]; alpha weighs the addition specialist A (default 0.1,0.3,0.5,0.7,0.9;"
                   " 0.1,0.5,0.9 with --quick)")
    p.add_argument("--seed", type=seed, default=0, help="seed of everything (default 0)")
    p.add_argument("--threads", type=whole_number(1, MAX_THREADS), default=1,
                   help="torch CPU threads (default 1: these models are too small to gain "
                   "from more, and one thread gives the same numbers on every machine)")
    add_count(p, "--pretrain-steps",
              "training steps of the base on copying (default 300, 100 with --quick)",
              maximum=MAX_COUNT)
    add_count(p, "--finetune-steps",
              "training steps of each specialist (default 500, 300 with --quick)",
              maximum=MAX_COUNT)
    add_count(p, "--eval-examples",
              "held-out prompts per task (default 200, 64 with --quick)",
              maximum=MAX_COUNT)
    p.add_argument("--no-plot", action="store_true",
                   help="skip accuracy.png and sweep.png (they need matplotlib: "
                   "pip install 'modkern[demo]')")
    p.set_defaults(command="demo")


def _check_out(out: Path) -> None:
    from ..checkpoint.out_folder import check_parent

    check_parent(out.absolute(), "--out")
    if out.exists() and (not out.is_dir() or
                         (any(out.iterdir()) and not (out / "results.json").exists())):
        raise CheckpointError(f"--out {str(out)!r} exists and is not an earlier demo's output "
                              "folder; give a new or empty folder")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..demo.report import format_table
    from ..demo.run import DemoConfig, run_demo

    quick = args.quick or os.environ.get(QUICK_ENV, "") not in ("", "0")
    config = DemoConfig.quick(args.seed) if quick else DemoConfig(seed=args.seed)
    overrides = {"alphas": tuple(args.alphas) if args.alphas else None,
                 "pretrain": args.pretrain_steps and replace(config.pretrain,
                                                             steps=args.pretrain_steps),
                 "finetune": args.finetune_steps and replace(config.finetune,
                                                             steps=args.finetune_steps),
                 "eval_examples": args.eval_examples}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    from ..checks import check_alpha  # imports torch: not at --help time
    for a in config.alphas:
        check_alpha(a, "--alphas")
    out = args.out or Path(tempfile.mkdtemp(prefix="modkern-demo-"))
    _check_out(out)

    start = time.perf_counter()
    print(f"modkern demo{' (quick)' if quick else ''}: writing to {out}", flush=True)
    result = run_demo(out, config, threads=args.threads, plot=not args.no_plot,
                      log=lambda line: print("  " + line, flush=True))
    print()
    print(format_table(result))
    print()
    for note in result.notes:
        print(f"note: {note}")
    saved = "checkpoints, results.json, table.txt, sweep.txt" + (
        ", accuracy.png, sweep.png" if result.plot else "")
    print(f"{saved} in {out} ({time.perf_counter() - start:.1f} s)")
    return 0
