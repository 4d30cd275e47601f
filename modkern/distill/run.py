"""`distill_checkpoints`: a student checkpoint folder trained on the mixture of teacher
checkpoints, published atomically as a Hugging Face folder with a recipe.

Everything is checked before the first step (paths, data, weights, tokenizers, heads);
the output is written to a temporary folder beside OUT and renamed into place only when
complete, so a failed or killed run leaves no OUT (or, with force, the previous one).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._version import __version__
from ..checkpoint.out_folder import check_out_folder, out_path
from ..checkpoint.publish import publish, temp_folder
from ..checkpoint.recipe import sha256_file, write_recipe
from ..errors import CheckpointError, DTypeError
from ..ops.kd_inputs import check_options, check_weights
from .data import read_prompt_answers
from .models import (ModelError, check_folder, check_head, check_same_tokenizer,
                     load_model, load_tokenizer, quiet_transformers)
from .train import DistillConfig, TrainResult, train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DistillReport:
    """What a distillation run did."""

    out: Path
    steps: int
    first_loss: float     # mean of the first ten steps
    last_loss: float      # mean of the last ten
    seconds: float
    target_tokens: int
    examples: int

    def summary(self) -> str:
        return (f"{self.steps} steps on {self.examples} examples in {self.seconds:.1f} s, "
                f"loss {self.first_loss:.4f} -> {self.last_loss:.4f}; wrote {self.out}")


def _load_all(student_dir: Path, teacher_dirs: Sequence[Path], dtype, device: str):
    """The tokenizer, the student and the teachers as Heads, checked to fit together."""
    tok = load_tokenizer(student_dir, "student")
    names = [f"teacher {i + 1}" for i in range(len(teacher_dirs))]
    for name, folder in zip(names, teacher_dirs):
        check_same_tokenizer(tok, load_tokenizer(folder, name), f"{name} {folder}")
    student = check_head("student", load_model(student_dir, "student", dtype, device))
    teachers = []
    for name, folder in zip(names, teacher_dirs):
        model = load_model(folder, name, dtype, device)
        model.requires_grad_(False)
        teachers.append(check_head(f"{name} {folder}", model))
    for head in (student, *teachers):
        width = min(head.vocab_in, head.weight.shape[0])
        if width < len(tok):
            raise ModelError(f"{head.name}: embeds and predicts {width} tokens but the "
                             f"tokenizer has {len(tok)}; expected at least as many")
    return tok, student, teachers


@dataclass
class _Job:
    """A checked distillation: inputs, output and settings."""

    student_dir: Path
    teacher_dirs: list[Path]
    data: Path
    out: Path
    weights: tuple[float, ...]
    config: DistillConfig
    device: str
    dtype: torch.dtype
    force: bool


def distill_checkpoints(student_dir, teacher_dirs: Sequence, data, out, *,
                        weights: Sequence[float] | None = None,
                        config: DistillConfig = DistillConfig(), device: str = "cpu",
                        dtype: str = "float32", force: bool = False, progress: bool = False,
                        log: Callable[[str], None] = print) -> DistillReport:
    """Train the model in `student_dir` on the prompt/response jsonl `data` towards the
    weighted mixture of the `teacher_dirs` models (default weights: equal) and publish
    it with its tokenizer and a recipe at `out`."""
    teacher_dirs = [Path(t) for t in teacher_dirs]
    if not teacher_dirs:
        raise ModelError("no teacher: give at least one")
    if dtype not in DTYPES:
        raise DTypeError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    K = len(teacher_dirs)
    job = _Job(Path(student_dir), teacher_dirs, Path(data), out_path(out),
               check_weights(weights if weights is not None else [1.0 / K] * K, K),
               config, device, DTYPES[dtype], force)
    check_folder(job.student_dir, "student")
    for i, folder in enumerate(teacher_dirs):
        check_folder(folder, f"teacher {i + 1}")
    inputs = {"student": job.student_dir.resolve()}
    inputs.update((f"teacher {i + 1}", t.resolve()) for i, t in enumerate(teacher_dirs))
    check_out_folder(job.out, inputs, force)
    check_options(config.temperature, config.kind, None)
    examples = read_prompt_answers(job.data)
    with quiet_transformers():
        return _train_and_publish(job, examples, progress, log)


def _train_and_publish(job: _Job, examples, progress: bool, log) -> DistillReport:
    tok, student, teachers = _load_all(job.student_dir, job.teacher_dirs, job.dtype,
                                       job.device)
    config = job.config
    log(f"distilling {len(teachers)} teacher(s) into {job.student_dir} on {len(examples)} "
        f"examples, {config.total_steps(len(examples))} steps")
    result = train(student, teachers, job.weights, tok, examples, config, device=job.device,
                   progress=progress, log=log)
    report = DistillReport(job.out, len(result.losses), result.mean(True),
                           result.mean(False), result.seconds, result.target_tokens,
                           len(examples))
    tmp = temp_folder(job.out)
    try:
        student.model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_recipe(tmp, _recipe(job, result, report),
                     header="modkern distill recipe: the inputs, options and losses of this run")
        publish(tmp, job.out, replace=job.force)
    except OSError as err:
        raise CheckpointError(f"OUT {job.out}: cannot write the checkpoint: "
                              f"{err.strerror or err}") from None
    finally:
        if tmp.exists():  # published: renamed away; failed: removed
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _recipe(job: _Job, result: TrainResult, report: DistillReport) -> dict:
    def model(folder: Path) -> dict:
        return {"path": str(folder), "config_sha256": sha256_file(folder / "config.json")}

    return {
        "method": "distill: a student trained on the mixture of its teachers' next-token "
                  "distributions (modkern.fused_linear_mixture_kd)",
        "command": "modkern distill --student S --teacher T1 [--teacher T2 ...] --weights "
                   "W1,W2 --data FILE --out OUT (the options below)",
        "modkern_version": __version__,
        "student": model(job.student_dir),
        "teachers": [{**model(t), "weight": w} for t, w in zip(job.teacher_dirs, job.weights)],
        "data": {"path": str(job.data), "sha256": sha256_file(job.data),
                 "examples": report.examples},
        "options": asdict(job.config) | {"steps": report.steps, "dtype": str(job.dtype),
                                         "device": job.device},
        "result": {"first_loss": report.first_loss, "last_loss": report.last_loss,
                   "seconds": round(report.seconds, 2),
                   "target_tokens": report.target_tokens,
                   "losses_every_step": [round(x, 5) for x in result.losses]},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
