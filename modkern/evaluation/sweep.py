"""Finding alpha on two models: `sweep` (the MoD merge, scored by any function of the
model) and `sweep_mixture` (mixture decoding, by the log-likelihood of prompt/answer
data). Both return a SweepResult (evaluation/result.py)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable

import torch

from ..checks import check_alpha
from ..errors import DTypeError, OptionError
from ..merging.patterns import AlphaRule
from ..merging.sweep import MergeSweep, SweepInputs, check_steps
from ..ops.select_context import MODELS
from .result import SweepResult, SweepRow, scores_of
from .scoring import EvalSet, TaskTotals, target_logits, token_logprobs

MERGE_OPTIONS = ("include", "exclude", "precision", "strict", "backend")
Score = Callable[[torch.nn.Module], "float | dict[str, float]"]


def sweep(model1: torch.nn.Module, model2: torch.nn.Module, alphas: Iterable[AlphaRule],
          score: Score, *, on_row: Callable[[SweepRow], None] | None = None,
          **merge_options) -> SweepResult:
    """Score the MoD merge of two models at every alpha, at the cost of what changes.

    One working copy of model 1 (copy.deepcopy, its parameters and buffers made
    contiguous) has its parameters (and floating-point buffers) patched in place, under
    torch.no_grad, to `merge_state_dicts(model1.state_dict(), model2.state_dict(), alpha,
    **merge_options)` at each step (sweep_merges' bit-identity), then `score(copy)` is
    called (also under no_grad) and must return a float or a dict of floats (e.g. per task
    and "mean", as the built-in scorers of modkern.evaluation.scoring do). model1 and
    model2 are never modified.

    Args:
        alphas: a list of floats in [0, 1] or alpha rules (see sweep_merges; a single
            alpha is refused: give `[alpha]`); monotone orders are the cheapest.
        score: a function of the merged model (higher is better).
        on_row: called with each row as soon as it is scored (e.g. to print progress).
        merge_options: include, exclude, precision, strict, backend (as merge_state_dicts).

    Returns a SweepResult: a row per alpha (scores, elements taken from model 2, seconds),
    `best`/`best_alpha`, `table()` and `plot(path)`.
    """
    check_steps(alphas, "sweep")
    check_models(model1, model2, "sweep")
    rules = list(alphas)
    options = check_merge_options(merge_options)
    work = working_copy(model1)
    inputs = SweepInputs(model1.state_dict(), model2.state_dict(), working=patchable(work))
    with torch.no_grad():
        swept = MergeSweep(inputs, rules, **options)
    return SweepResult([score_step(swept, k, rule, work, score, on_row)
                        for k, rule in enumerate(rules)],
                       metric=getattr(score, "metric", "score"))


def check_merge_options(options: dict) -> dict:
    """The options a sweep passes to the merge, or OptionError naming the unknown one."""
    for name in options:
        if name not in MERGE_OPTIONS:
            raise OptionError(f"sweep: unknown merge option {name!r}; expected any of "
                              f"{', '.join(MERGE_OPTIONS)}")
    return options


def check_models(model1: object, model2: object, where: str) -> None:
    """DTypeError unless both models are torch modules (a state dict goes to
    sweep_merges)."""
    for label, model in zip(MODELS, (model1, model2)):
        if not isinstance(model, torch.nn.Module):
            raise DTypeError(f"{where}: {label} is a {type(model).__name__}; expected a "
                             "torch.nn.Module (for state dicts use sweep_merges)")


def working_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose parameters and buffers are contiguous (patched through
    flat views); tensors shared between modules stay shared."""
    work = copy.deepcopy(model)
    for tensor in [*work.parameters(), *work.buffers()]:
        if not tensor.is_contiguous():
            tensor.data = tensor.data.contiguous()
    return work


def patchable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict, each floating-point entry checked to be a view of one of its
    parameters or buffers (patching it patches the model)."""
    owned = {t.untyped_storage().data_ptr()
             for t in [*model.parameters(), *model.buffers()]}
    state = model.state_dict()
    for name, t in state.items():
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in owned:
            raise OptionError(f"sweep: model 1's state_dict() entry {name!r} is a copy, not "
                              "a view of a parameter or buffer, so the working model cannot "
                              "be patched through it; sweep the state dicts with "
                              "sweep_merges instead")
    return state


def score_step(swept: MergeSweep, step: int | None, rule: AlphaRule, model: torch.nn.Module,
               score: Score, on_row: Callable[[SweepRow], None] | None = None) -> SweepRow:
    """Make the merge of step `step` (None: of `rule`, not among the steps) and score it."""
    start = time.perf_counter()
    with torch.no_grad():
        swept.step(step) if step is not None else swept.apply(rule)
        made = time.perf_counter()
        value = score(model)
    row = SweepRow(rule, scores_of(value), swept.stats.elements_taken,
                   swept.stats.elements_merged, made - start, time.perf_counter() - made)
    if on_row is not None:
        on_row(row)
    return row


def sweep_mixture(model1: torch.nn.Module, model2: torch.nn.Module, alphas: Iterable[float],
                  data: EvalSet, *, backend: str = "auto") -> SweepResult:
    """The log-likelihood of prompt/answer data under mixture decoding,
    log(alpha * p1 + (1 - alpha) * p2), at every alpha: one forward of each model per
    batch, then `mix_logits` at the answer tokens for every alpha (vocab="common", as
    mixture decoding uses). Rows as `sweep`'s (no element counts; `score_seconds` is the
    mixing, the forwards are in `notes`)."""
    from ..ops.mix import mix_logits

    check_steps(alphas, "sweep_mixture")
    check_models(model1, model2, "sweep_mixture")
    alphas = [check_alpha(a, "sweep_mixture alpha") for a in alphas]
    totals = [TaskTotals(data.tasks) for _ in alphas]
    mixing = [0.0] * len(alphas)
    forward = 0.0
    with torch.no_grad():
        for batch in data.batches():
            start = time.perf_counter()
            l1, tokens, numbers = target_logits(model1, batch)
            l2 = target_logits(model2, batch)[0].to(l1.device)
            forward += time.perf_counter() - start
            for k, alpha in enumerate(alphas):
                start = time.perf_counter()
                logp = mix_logits(l1, l2, alpha, vocab="common", backend=backend)
                totals[k].add(token_logprobs(logp, tokens), numbers)
                mixing[k] += time.perf_counter() - start
    rows_out = [SweepRow(a, t.scores(), score_seconds=s)
                for a, t, s in zip(alphas, totals, mixing)]
    return SweepResult(rows_out, method="mixture", metric="log-likelihood",
                       notes=[f"one forward of each model per batch: {forward:.2f} s"])
