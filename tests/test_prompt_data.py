"""The one prompt/answer JSON Lines reader (modkern sweep, modkern distill) on hostile and
unusual files: each bad line is one DataError naming file:line and the field, and valid
JSON is read as JSON defines it."""

from __future__ import annotations

import json

import pytest

from modkern import DataError
from modkern.evaluation.data import Example, read_prompt_answers


def write(tmp_path, text: str, encoding: str = "utf-8"):
    path = tmp_path / "data.jsonl"
    path.write_bytes(text.encode(encoding, errors="surrogatepass"))
    return path


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c"])
def test_line_breaks_inside_json_strings_are_text(tmp_path, separator):
    """JSON allows these raw inside a string (json.dumps(ensure_ascii=False) writes them
    so); only \\n ends a line."""
    line = json.dumps({"prompt": f"a{separator}b=", "answer": "c"}, ensure_ascii=False)
    got = read_prompt_answers(write(tmp_path, line + "\n"))
    assert got == [Example(f"a{separator}b=", "c", None, f"{tmp_path / 'data.jsonl'}:1")]


def test_crlf_and_byte_order_mark(tmp_path):
    path = write(tmp_path, '\ufeff{"prompt": "1=", "answer": "1"}\r\n'
                           '{"prompt": "2=", "response": "2", "task": "t"}\r\n')
    got = read_prompt_answers(path)
    assert [(e.prompt, e.answer, e.task) for e in got] == [("1=", "1", None), ("2=", "2", "t")]


def test_reads_examples_skipping_blank_lines(tmp_path):
    path = write(tmp_path, json.dumps({"prompt": "a=", "answer": "b", "task": "t"}) + "\n\n"
                 + json.dumps({"prompt": "", "answer": "x", "extra": 1}) + "\n")
    got = read_prompt_answers(path)
    assert [(e.prompt, e.answer, e.task) for e in got] == [("a=", "b", "t"), ("", "x", None)]
    assert got[1].where == f"{path}:3"


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON list"),
    ('{"answer": "4"}', 'field "prompt" is missing'),
    ('{"prompt": "2+2=", "answer": 4}', 'field "answer" is a int'),
    ('{"prompt": "2+2=", "answer": ""}', 'field "answer" is empty'),
    ('{"prompt": "2+2=", "answer": "4", "task": 3}', 'field "task" is 3'),
    ('{"prompt": "2+2=", "answer": "4", "task": "mean"}', 'field "task" is \'mean\''),
    ("[" * 100_000, "JSON nested too deeply"),
    ('{"a": ' * 50_000 + "1" + "}" * 50_000, "JSON nested too deeply"),
    ('{"prompt": "w1 \\ud800", "answer": "x"}', 'field "prompt" holds'),
    ('{"prompt": "w", "answer": "\\udfff"}', 'field "answer" holds'),
    ('{"prompt": "w", "answer": "x", "task": "\\ud800t"}', 'field "task" holds'),
    ('{"prompt": "w", "response": ""}', 'field "response" is empty'),
    ('{"prompt": "w", "answer": "x", "response": "y"}', 'both "answer" and "response"'),
    ('{"prompt": null, "answer": "x"}', 'field "prompt" is a NoneType'),
    ('"just a string"', "a JSON str, expected an object"),
    ("1e999999", "a JSON float, expected an object"),
    ("NaN", "a JSON float, expected an object"),
])
def test_malformed_lines_are_one_data_error(tmp_path, line, message):
    path = write(tmp_path, '{"prompt": "1=", "answer": "1"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_prompt_answers(path)
    text = str(e.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text


def test_unreadable_empty_not_utf8_and_not_a_file(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_prompt_answers(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no examples"):
        read_prompt_answers(write(tmp_path, "\n  \n"))
    with pytest.raises(DataError, match="cannot read: not UTF-8 text"):
        read_prompt_answers(write(tmp_path, "caf\xe9", encoding="latin-1"))
    with pytest.raises(DataError, match="cannot read: Is a directory"):
        read_prompt_answers(tmp_path)
