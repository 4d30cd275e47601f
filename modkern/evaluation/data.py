"""Prompt/answer data, for scoring (modkern sweep) and for training (modkern distill): a
JSON Lines file, one example per line,

    {"prompt": "57+8=", "answer": "65", "task": "addition"}

with "response" accepted for "answer" (one of the two) and `task` optional (scores are then
given per task and as their mean). Blank lines are skipped; lines end at "\n" only (JSON
strings may hold U+2028 and the like raw), a leading byte-order mark is allowed. A
malformed file raises one DataError naming file:line and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

MEAN = "mean"  # the key of the mean over tasks in every score dict (no task may be named so)
UNTAGGED = "untagged"  # the task of lines without one, when other lines have one
TARGETS = ("answer", "response")  # the names the text after the prompt may go by
EXAMPLE_LINE = '{"prompt": "2+2=", "answer": "4"}'


@dataclass(frozen=True)
class Example:
    """One prompt and the answer expected after it; `where` (file:line) names it in
    errors."""

    prompt: str
    answer: str
    task: str | None = None
    where: str = ""


def read_prompt_answers(path: str | os.PathLike) -> list[Example]:
    """The examples of a prompt/answer JSON Lines file (see the module docstring).

    Raises DataError naming file:line and the field for an unreadable file, a line that is
    not a JSON object, a missing or non-string prompt or answer, an empty answer, a task
    that is not a non-empty string (or is named "mean"), and a file with no example."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise DataError(f"{path}: cannot read: {reason}; expected a JSON Lines file of "
                        '{"prompt": ..., "answer": ...} objects') from None
    examples = [example_from_line(line, f"{path}:{number}")
                for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not examples:
        raise DataError(f"{path}: no examples; expected one JSON object per line with "
                        '"prompt" and "answer" strings')
    return examples


def example_from_line(line: str, where: str) -> Example:
    """One line of the file as an Example (DataError naming `where` and the field)."""
    record = _json_object(line, where)
    given = [f for f in TARGETS if f in record]
    if len(given) > 1:
        raise DataError(f'{where}: both "answer" and "response" given; expected one of them')
    prompt = _text(record, "prompt", where)
    answer = _text(record, given[0] if given else "answer", where)
    if not answer:
        raise DataError(f'{where}: field "{given[0]}" is empty; expected the text that '
                        "follows the prompt")
    task = record.get("task")
    if task is not None and (not isinstance(task, str) or not task or task == MEAN):
        raise DataError(f'{where}: field "task" is {task!r}; expected a non-empty string '
                        f'other than "{MEAN}"')
    if task is not None:
        _text(record, "task", where)
    return Example(prompt, answer, task, where)


def _json_object(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not JSON ({err.msg} at column {err.colno}); expected "
                        f"an object such as {EXAMPLE_LINE}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply; expected an object such as "
                        f"{EXAMPLE_LINE}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__}, expected an object such "
                        f"as {EXAMPLE_LINE}")
    return record


def _text(record: dict, field: str, where: str) -> str:
    """record[field], a string a tokenizer can take (UTF-8: no lone surrogates)."""
    if field not in record:
        name = '"answer" (or "response")' if field == "answer" else f'"{field}"'
        raise DataError(f"{where}: field {name} is missing; expected a string")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{field}" is a {type(value).__name__}, expected a '
                        "string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f'{where}: field "{field}" holds {value[err.start]!r} at character '
                        f"{err.start}, a lone surrogate; expected text that is valid "
                        "Unicode") from None
    return value


def task_names(examples: list[Example]) -> list[str]:
    """The tasks in order of first appearance ([] when no example names one); examples
    without a task then belong to UNTAGGED."""
    names = list(dict.fromkeys(e.task for e in examples if e.task is not None))
    if names and any(e.task is None for e in examples):
        names.append(UNTAGGED)
    return names


def task_of(example: Example, tasks: list[str]) -> str | None:
    """The task an example is scored under (None: no tasks)."""
    if not tasks:
        return None
    return example.task if example.task is not None else UNTAGGED
