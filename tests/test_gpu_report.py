"""bench/gpu_report.py and bench/gpu_check.py without running any stage: targets judged from
hand-made rows, the test summary from JUnit XML and from a killed run's log, the result
files and their sanity check, and the CUDA pass's test list still naming real tests.
(CI runs the whole check end to end: `python bench/gpu_check.py --out DIR --dry-run`.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
import gpu_report  # noqa: E402
from gpu_report import Target, judge  # noqa: E402


def row(case, impl, seconds, floor=1000, **kw):
    return {"group": f"g-{case}", "case": case, "impl": impl, "seconds": seconds,
            "bytes_floor": floor, "gb_per_s": floor / seconds / 1e9, **kw}


ROWS = [row("c", "modkern", 2.0), row("c", "copy", 1.0), row("c", "eager", 20.0),
        row("c", "compiled", 2.5), {"case": "c", "impl": "slow", "skipped": "budget spent"},
        {"case": "c", "impl": "broken", "error": "RuntimeError: capture failed"}]


@pytest.mark.parametrize("target, status, value", [
    (Target("a", "", "c", "modkern", "share", 0.5), "met", 0.5),  # copy 1.0 s, modkern 2.0 s
    (Target("b", "", "c", "modkern", "share", 0.85), "not met", 0.5),
    (Target("c", "", "c", "modkern", "over_copy", 1.2), "not met", 2.0),
    (Target("d", "", "c", "modkern", "speedup", 5.0, "eager"), "met", 10.0),
    (Target("e", "", "c", "modkern", "speedup", 1.5, "compiled"), "not met", 1.25),
    (Target("f", "", "c", "modkern", "speedup", 1.0, "compiled"), "met", 1.25),
    (Target("g", "", "c", "modkern", "ratio", 1.0, "compiled"), "met", 0.8),
    (Target("h", "", "c", "modkern", "seconds", 15e-6), "not met", 2.0),
    (Target("i", "", "c", "eager", "runs"), "met", 1.0),
])
def test_targets_are_judged_from_the_rows(target, status, value):
    got = judge(target, ROWS)
    assert got["status"] == status
    assert got["value"] == pytest.approx(value)


@pytest.mark.parametrize("impl, peer, reason", [
    ("slow", "", "budget spent"), ("broken", "", "capture failed"),
    ("modkern", "absent", "no absent row for c"), ("missing", "", "no missing row for c")])
def test_a_target_not_measured_says_why(impl, peer, reason):
    got = judge(Target("x", "", "c", impl, "speedup" if peer else "runs", 1.0, peer), ROWS)
    assert got["status"] == "not measured" and got["value"] is None
    assert reason in got["note"]


def test_every_issue_target_has_a_case_the_suites_emit():
    suites = "".join((ROOT / "bench" / f).read_text() for f in
                     ("bench_gpu_select.py", "bench_gpu_mix.py", "bench_gpu_checkpoint.py"))
    for t in gpu_report.TARGETS:
        for impl in (t.impl, t.peer):
            assert not impl or f'"{impl}"' in suites, (t.id, impl)
        assert t.case.split("-")[0] in suites, t.id


JUNIT = """<?xml version="1.0"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_a" name="test_ok"/>
<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2">x</failure>
</testcase><testcase classname="tests.test_b" name="test_skip"><skipped message="no"/></testcase>
<testcase classname="tests.test_b" name="test_err"><error message="boom"/></testcase>
</testsuite></testsuites>"""

LOG = """
===== tests: python -m pytest ...
tests/test_a.py::test_ok PASSED                                   [  1%]
[gw1] [  2%] FAILED tests/test_a.py::test_bad[cuda-bf16]
[gw0] [  3%] SKIPPED tests/test_b.py::test_skip
tests/test_b.py::test_more PASSED                                 [  4%]
===== tests: killed at its time limit of 130 s
===== checkpoint: python -m pytest ...
bench/x.py::bench_y PASSED
"""


def test_test_summary_from_junit_and_from_a_killed_runs_log(tmp_path):
    (tmp_path / "t.xml").write_text(JUNIT)
    got = gpu_report.load_tests(tmp_path / "t.xml", tmp_path / "none.log")
    assert (got["passed"], got["failed"], got["error"], got["skipped"]) == (1, 1, 1, 1)
    assert [f["test"] for f in got["failures"]] == ["tests.test_a::test_bad",
                                                    "tests.test_b::test_err"]
    assert got["failures"][0]["message"] == "assert 1 == 2"
    (tmp_path / "run.log").write_text(LOG)
    got = gpu_report.load_tests(tmp_path / "missing.xml", tmp_path / "run.log")
    assert (got["passed"], got["failed"], got["skipped"], got["source"]) == (2, 1, 1, "log")
    assert got["failures"] == [{"test": "tests/test_a.py::test_bad[cuda-bf16]",
                                "message": "FAILED"}]


def test_result_files_are_written_and_checked(tmp_path):
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    (scratch / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n{cut")
    (scratch / "env.json").write_text(json.dumps({"gpu": "G", "torch": "2", "triton": "3",
                                                  "date": "today"}))
    stages = [{"name": "bench", "status": "timeout", "seconds": 9.0, "error": "timed out"}]
    problems = gpu_report.write_all(out, scratch, stages=stages, dry_run=True, budget_s=10,
                                    elapsed_s=9)
    assert problems == []
    data = json.loads((out / "gpu_results.json").read_text())
    assert len(data["rows"]) == len(ROWS) and data["stages"] == stages
    md = (out / "gpu_results.md").read_text()
    assert "| bench | timeout |" in md and "**Dry run**" in md
    assert "| eager | 20.00 s | 0.001 | 5e-08 | 5% | 10x |" in md
    (out / "gpu_bench.csv").write_text("group,case,impl,seconds\n")
    assert "gpu_bench.csv and gpu_results.json hold different rows" in \
        gpu_report.check_outputs(out)
    (out / "gpu_results.md").unlink()
    assert gpu_report.check_outputs(out) == ["gpu_results.md is missing"]


def test_the_cuda_pass_names_tests_that_exist():
    for f in gpu_check.CUDA_TESTS:
        assert (ROOT / f).is_file(), f
    for node in gpu_check.DESELECT:
        path, name = node.split("::")
        assert f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), node


def test_arguments():
    assert gpu_check.parse_args(["--out", "d", "--dry-run"]).dry_run
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "d", "--skip", "nonsense"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])


def test_a_stage_is_killed_at_its_limit_and_failures_are_reported(tmp_path):
    import os
    log = tmp_path / "log"
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen("
               "[sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"]
    got = gpu_check.run_command(sleeper, 1.0, dict(os.environ), log, "sleepy")
    assert got["status"] == "timeout" and got["seconds"] < 15
    assert "killed at its time limit" in log.read_text()
    got = gpu_check.run_command([sys.executable, "-c", "raise SystemExit(3)"], 30,
                                dict(os.environ), log, "bad")
    assert (got["status"], got["rc"]) == ("failed", 3)
