"""The work of `modkern sweep` (cli/sweep.py checks the arguments): the merge sweep on two
checkpoints, with its per-layer refinement and the best merge written, or the mixture
sweep."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..evaluation.data import Example
from ..evaluation.result import SweepResult, SweepRow

Log = Callable[[str], None]


def progress(log: Log) -> Callable[[SweepRow], None]:
    """A row callback that logs each scored alpha (its scores and seconds) as it is done."""
    def show(row: SweepRow) -> None:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in row.scores.items())
        log(f"alpha {row.label}: {scores} ({row.seconds + row.score_seconds:.2f} s)")
    return show


def run_merge(args: argparse.Namespace, grid: list[float], examples: list[Example],
              log: Log) -> tuple[SweepResult, object]:
    """Sweep the MoD merge over `grid` (descending, so every element is written at most
    once), print the table (and the per-layer search); the result and the per-layer
    search (None without --per-layer), for write_best."""
    from ..checkpoint.report import format_bytes
    from ..checkpoint.sweep import open_checkpoint_sweep
    from ..evaluation.per_layer import refine_per_layer
    from ..evaluation.scoring import EvalSet, exact_match_scorer, loglik_scorer
    from ..evaluation.sweep import score_step

    base, other = args.base, args.other
    order = sorted(grid, reverse=True)
    per_layer = None
    with open_checkpoint_sweep(base, other, order, include=args.include,
                               exclude=args.exclude, strict=args.strict,
                               precision=args.precision) as opened:
        data = EvalSet(examples, opened.tokenizer, batch_size=args.batch_size,
                       add_eos=args.add_eos)
        score = loglik_scorer(data) if args.metric == "loglik" else exact_match_scorer(data)
        rows = [score_step(opened.swept, k, a, opened.model, score, progress(log))
                for k, a in enumerate(order)]
        read, size = opened.ck2.bytes_read, opened.ck2.weight_bytes
        result = SweepResult(sorted(rows, key=lambda r: r.alpha), metric=score.metric)
        result.notes.append(f"read {format_bytes(read)} of OTHER's {format_bytes(size)} "
                            f"({read / max(size, 1):.1%}): the elements alpha "
                            f"{min(grid):g} takes")
        if args.per_layer:
            best = result.best
            per_layer = refine_per_layer(opened.swept, opened.model, score, grid,
                                         best.alpha, result.value(best),
                                         on_row=progress(log))
    print(result.table())
    for note in result.notes:
        print(note)
    if per_layer is not None:
        print(per_layer.summary())
    return result, per_layer


def write_best(args: argparse.Namespace, result: SweepResult, per_layer) -> None:
    """The best merge (the per-layer rule when it gains) through merge_checkpoints, the
    sweep recorded in its recipe."""
    from ..checkpoint.merge import merge_checkpoints

    best = per_layer.rule if per_layer is not None and per_layer.gain > 0 \
        else result.best_alpha
    record = {"command": "modkern sweep", "eval": str(args.eval), "metric": result.metric,
              "objective": result.objective, "rows": result.records(),
              "best_alpha": result.best_alpha}
    if per_layer is not None:
        record["per_layer"] = {"rule": per_layer.rule, "objective": per_layer.value,
                               "gain": per_layer.gain,
                               "candidates": [r.record() for r in per_layer.rows]}
    report = merge_checkpoints(args.base, args.other, args.out, best, include=args.include,
                               exclude=args.exclude, strict=args.strict,
                               precision=args.precision, force=args.force, progress=False,
                               extra_recipe={"sweep": record})
    print(f"best merge written to {args.out}: {report.summary()}")


def run_mixture(args: argparse.Namespace, grid: list[float], examples: list[Example],
                log: Log) -> SweepResult:
    """Sweep mixture decoding's alpha over `grid`; print the table."""
    from ..checkpoint.sweep import load_pair
    from ..evaluation.scoring import EvalSet
    from ..evaluation.sweep import sweep_mixture

    base, other = args.base, args.other
    model1, model2, tokenizer = load_pair(base, other)
    data = EvalSet(examples, tokenizer, batch_size=args.batch_size, add_eos=args.add_eos)
    log(f"scoring mixture decoding at {len(grid)} alphas on {len(examples)} examples")
    result = sweep_mixture(model1, model2, sorted(grid), data)
    print(result.table())
    for note in result.notes:
        print(note)
    return result
