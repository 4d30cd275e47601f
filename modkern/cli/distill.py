"""`modkern distill`: train a student on the mixture of several teachers' next-token
distributions (heterogeneous merging: the teachers may be of different architectures,
as long as they share the student's tokenizer).

    modkern distill --student S --teacher A --teacher B --weights 0.5,0.5 \\
        --data train.jsonl --out OUT --steps 500 --lr 2e-5 --batch 8

DATA is jsonl, one {"prompt": ..., "response": ...} object per line ("answer" may stand
for "response"). The loss covers the response tokens only: at each of them the student's
distribution is pulled towards sum_k w_k softmax(teacher_k / T), by the fused loss that
never builds the student's or a teacher's [tokens, vocab] logits. Vocabulary widths may
differ (padded heads): the common prefix is used. OUT is written atomically, a Hugging
Face folder (safetensors, config, tokenizer) with modkern_recipe.yaml; a failed or killed
run leaves no OUT.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .arguments import add_count, add_force, add_quiet, number_list, real_number, seed, subcommand

KINDS = ("forward_kl", "reverse_kl", "jsd")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "distill", "train a student on the mixture of teacher models",
                   __doc__)
    p.add_argument("--student", required=True, type=Path, metavar="DIR",
                   help="the model to train: a local Hugging Face causal LM folder (its "
                   "tokenizer is the one every teacher must share)")
    p.add_argument("--teacher", action="append", required=True, type=Path, metavar="DIR",
                   help="a teacher model folder (repeat for each teacher; any causal LM "
                   "architecture)")
    p.add_argument("--weights", type=number_list("0.5,0.5"), default=None, metavar="W1,W2,...",
                   help="the teachers' weights in the mixture, in --teacher order, each in "
                   "[0, 1], summing to 1 (default: equal)")
    p.add_argument("--data", required=True, type=Path, metavar="FILE",
                   help="training jsonl: {\"prompt\": ..., \"response\" (or \"answer\"): "
                   "...} per line")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="where the trained student is published (must not exist unless "
                   "--force)")
    add_count(p, "--steps", "optimizer steps (default: one pass over the data)")
    p.add_argument("--lr", type=real_number(0.0, 1.0, low_open=True), default=2e-5,
                   help="peak learning rate of AdamW, in (0, 1], after a warmup over the "
                   "first 5%% of the steps, then decaying linearly (default 2e-5)")
    add_count(p, "--batch", "examples per step (default 8)", default=8)
    add_count(p, "--max-length", "tokens per example, prompt + response; longer ones are cut "
                   "(default 512)", default=512)
    p.add_argument("--temperature", type=real_number(0.0, 100.0, low_open=True), default=1.0,
                   metavar="T",
                   help="softmax temperature of student and teachers, in (0, 100] "
                   "(default 1)")
    p.add_argument("--kind", choices=KINDS, default="forward_kl",
                   help="the divergence: forward_kl = KL(mixture || student) (default), "
                   "reverse_kl = KL(student || mixture), jsd = Jensen-Shannon")
    p.add_argument("--seed", type=seed, default=0,
                   help="seed of the data order and of torch (default 0)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), or cuda / cuda:N (the loss then runs as Triton "
                   "kernels)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the models are loaded and trained in (default float32)")
    add_count(p, "--log-every", "print the mean loss every N steps (default: about ten lines)")
    add_force(p)
    add_quiet(p, "no progress bar, loss lines or summary")
    p.set_defaults(command="distill")


def _terminate(signum, frame):  # SIGTERM: unwind like Ctrl-C, so the temp folder goes
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from ..distill.run import distill_checkpoints
    from ..distill.train import DistillConfig

    config = DistillConfig(steps=args.steps, lr=args.lr, batch=args.batch,
                           max_length=args.max_length, temperature=args.temperature,
                           kind=args.kind, seed=args.seed, log_every=args.log_every)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        report = distill_checkpoints(
            args.student, args.teacher, args.data, args.out, weights=args.weights,
            config=config, device=args.device, dtype=args.dtype, force=args.force,
            progress=not args.quiet and sys.stderr.isatty(),
            log=(lambda line: None) if args.quiet else (lambda line: print(line, flush=True)))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not args.quiet:
        print(f"modkern distill: {report.summary()}")
    return 0
