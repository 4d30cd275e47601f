"""`modkern sweep`: find alpha by scoring the MoD merge of two checkpoints at many alphas on
your prompt/answer data, at the cost of what changes between alphas.

    modkern sweep BASE OTHER --alpha 0.1:0.9:0.1 --eval data.jsonl
    modkern sweep BASE OTHER --alpha 0.5,0.7,0.9 --eval data.jsonl --metric exact \\
        --include mlp --per-layer --out BEST --plot sweep.png
    modkern sweep BASE OTHER --alpha 0:1:0.25 --eval data.jsonl --mixture

data.jsonl holds one {"prompt": ..., "answer": ..., "task": optional} object per line.
BASE is loaded as the working model and patched in place from one alpha to the next;
OTHER is read only at the elements the lowest alpha takes. Prints one row per alpha (the
scores per task and their mean, the elements taken from OTHER, seconds) and the best
alpha; --out then writes the best merge with merge_checkpoints (the same weights as
`modkern merge BASE OTHER BEST --alpha <best>`, the sweep's table in its recipe).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ..errors import AlphaError, OptionError
from .arguments import add_count, add_force, add_quiet, add_tensor_choice, subcommand


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "sweep", "score merges of two checkpoints over alpha, pick the "
                       "best",
                   __doc__)
    # two positionals rather than nargs=2 with a tuple metavar, which argparse's help
    # formatter cannot print on some Pythons (3.11: ValueError)
    p.add_argument("base", metavar="BASE", help="model 1 (the base): a Hugging Face "
                   "checkpoint folder")
    p.add_argument("other", metavar="OTHER", help="model 2: a Hugging Face checkpoint folder")
    p.add_argument("--alpha", required=True, metavar="GRID",
                   help="the alphas: START:STOP:STEP (STOP included, e.g. 0.1:0.9:0.1) or "
                   "a comma list (0.5,0.7,0.9); each in [0, 1]")
    p.add_argument("--eval", required=True, type=Path, metavar="FILE",
                   help='JSON Lines of {"prompt", "answer", "task" (optional)} to score on')
    p.add_argument("--metric", choices=("loglik", "exact"), default="loglik",
                   help="loglik (default): mean log-likelihood of the answer tokens, "
                   "teacher-forced; exact: exact match of the greedy continuation")
    add_tensor_choice(p)
    p.set_defaults(strict=True, precision="exact")
    p.add_argument("--out", type=Path, metavar="BEST",
                   help="write the best merge (the per-layer rule with --per-layer, when it "
                   "gains) to this new folder with merge_checkpoints")
    add_force(p, "BEST")
    p.add_argument("--plot", type=Path, metavar="PNG",
                   help="save the scores against alpha as a png (needs matplotlib)")
    p.add_argument("--per-layer", action="store_true",
                   help="then refine alpha per layer group (model.layers.N.) by a short "
                   "coordinate search (each candidate costs only its changes) and report "
                   "its gain over the best global alpha")
    p.add_argument("--mixture", action="store_true",
                   help="sweep mixture decoding's alpha instead (log-likelihood of "
                   "alpha*p1 + (1-alpha)*p2; loads both models whole)")
    add_count(p, "--batch-size", "examples per forward (default 16)", default=16)
    p.add_argument("--add-eos", action="store_true",
                   help="also score the end-of-sequence token after each answer (the model "
                   "should stop there); with --metric exact the continuation must stop too")
    add_quiet(p, "no progress lines")
    p.set_defaults(command="sweep")


MAX_ALPHAS = 1001  # a grid step of 0.001 over [0, 1]; more is a typo, not a sweep


def parse_grid(text: str) -> list[float]:
    """--alpha: START:STOP:STEP (STOP included when on the grid) or a comma list; the
    distinct values in order, each checked in [0, 1]."""
    from ..checks import check_alpha

    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not (step > 0 and stop >= start and math.isfinite(stop - start)
                    and math.isfinite((stop - start) / step)):
                raise ValueError
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + i * step, 10) for i in range(min(count, MAX_ALPHAS + 1))]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except (ValueError, OverflowError):
        raise AlphaError(f"--alpha {text!r}: expected START:STOP:STEP, finite, with STEP > 0 "
                         "and STOP >= START (e.g. 0.1:0.9:0.1) or numbers separated by commas"
                         ) from None
    if not values:
        raise AlphaError(f"--alpha {text!r}: no alpha given")
    if ":" in text and count > MAX_ALPHAS or len(values) > MAX_ALPHAS:
        given = count if ":" in text else len(values)
        raise AlphaError(f"--alpha: {given} alphas; expected at most {MAX_ALPHAS} (a "
                         "coarser grid)")
    return list(dict.fromkeys(check_alpha(v, f"--alpha value {v!r}") for v in values))


def check_args(args: argparse.Namespace) -> list[float]:
    """Everything checkable before any work; the grid."""
    from ..checkpoint.out_folder import check_out_path, check_space

    grid = parse_grid(args.alpha)
    if args.mixture:
        for flag, given in (("--out", args.out), ("--per-layer", args.per_layer),
                            ("--include", args.include), ("--exclude", args.exclude),
                            ("--metric exact", args.metric == "exact")):
            if given:
                raise OptionError(f"{flag} does not apply to --mixture (mixture decoding "
                                  "merges no weights and is scored by log-likelihood)")
    base, other = (Path(p).absolute() for p in (args.base, args.other))
    if args.out is not None:
        out = args.out.absolute().resolve()
        check_out_path(base.resolve(), other.resolve(), out, args.force)
        # the best merge is written after the whole sweep: its room is checked now
        check_space(out, sum(f.stat().st_size for f in base.glob("*.safetensors")))
    if args.plot is not None:
        check_plot_path(args.plot)
    return grid


def check_plot_path(path: Path) -> None:
    """--plot: a file name in an existing folder, of a format matplotlib writes (png, pdf,
    svg, ...); matplotlib itself is needed. Checked before the sweep, not after it."""
    from ..evaluation.result import pyplot

    plt = pyplot()
    figure = plt.figure()
    formats = figure.canvas.get_supported_filetypes()
    plt.close(figure)
    if path.suffix.lower().lstrip(".") not in formats:
        raise OptionError(f"--plot {path}: expected a file name ending in one of "
                          f"{', '.join('.' + f for f in sorted(formats))} (e.g. sweep.png)")
    if path.is_dir() or not path.absolute().parent.is_dir():
        raise OptionError(f"--plot {path}: expected a file name in an existing folder")


def run(args: argparse.Namespace) -> int:
    from ..evaluation.data import read_prompt_answers

    grid = check_args(args)
    examples = read_prompt_answers(args.eval)
    log = (lambda line: None) if args.quiet else (
        lambda line: print(f"modkern sweep: {line}", file=sys.stderr, flush=True))
    if args.mixture:
        from .sweep_run import run_mixture
        result, per_layer = run_mixture(args, grid, examples, log), None
    else:
        from .sweep_run import run_merge
        result, per_layer = run_merge(args, grid, examples, log)
    if args.plot is not None:  # before the best merge: a plot that fails leaves no OUT
        save_plot(result, args.plot)
        print(f"plot: {args.plot}")
    if args.out is not None:
        from .sweep_run import write_best
        write_best(args, result, per_layer)
    return 0


def save_plot(result, path: Path) -> None:
    """result.plot into a temporary file beside `path`, renamed over it when complete."""
    path = path.absolute()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        result.plot(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

