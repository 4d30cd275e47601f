"""The report of bench/gpu_check.py: the GPU targets of docs/design.md 4, judged from the
rows the GPU suites emit (one JSON line per row, see _common.emit_row), the test pass
summarised from JUnit XML, and the files written into the output folder:

    gpu_results.md    machine, stages, tests, targets (met / not met / not measured), tables
    gpu_results.json  the same as data: machine, stages, tests, targets, every row
    gpu_bench.csv     one line per row (the raw figures)
    gpu_bench.json    pytest-benchmark's JSON of every bench stage, merged
    gpu_tests.xml     the test pass's JUnit XML;   gpu_check.log   every stage's output

Every GPU row is compared with the `copy` row of its case, a device-to-device copy moving
the same floor bytes, measured in the same run: "share of copy" is the row's GB/s on its
floor over the copy's.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

FILES = ("gpu_results.md", "gpu_results.json", "gpu_bench.csv")


@dataclass(frozen=True)
class Target:
    """One target of docs/design.md 4: `kind` says how the value is computed from the case's
    rows."""

    id: str
    what: str
    case: str
    impl: str
    kind: str  # share | over_copy | speedup | seconds | ratio | runs
    bar: float = 0.0
    peer: str = ""


def _select_targets() -> list[Target]:
    out = []
    for name, shape in (("mlp", "18944x3584"), ("embed", "151936x3584")):
        c, what = f"select-{name}", f"mod_select bf16 {shape}, out of place"
        out += [Target(f"{c}-copy", f"{what}: share of copy bandwidth", c, "modkern",
                       "share", 0.85),
                Target(f"{c}-eager", f"{what}: x the paper's eager formula", c, "modkern",
                       "speedup", 5.0, "paper-eager"),
                Target(f"{c}-compile", f"{what}: x torch.compile of it", c, "modkern",
                       "speedup", 1.5, "paper-compiled"),
                Target(f"select_-{name}", f"mod_select_ bf16 {shape}, in place: time over "
                       "one read of t1", f"select_-{name}", "modkern-inplace", "over_copy",
                       1.2)]
    return out + [Target("merge-7b", "merge_state_dicts, Qwen2.5-7B-shaped: time over the "
                         "sum of its tensors' floors (out of place)", "merge-7b", "modkern",
                         "over_copy", 1.3),
                  Target("merge_-7b", "merge_state_dicts, Qwen2.5-7B-shaped, in place: time "
                         "over the sum of its floors", "merge_-7b", "modkern-inplace",
                         "over_copy", 1.3)]


def _mix_targets() -> list[Target]:
    out = []
    for step, label in (("fwd", "forward"), ("train", "forward + backward")):
        for dt in ("bf16", "fp32"):
            c, what = f"mix-{step}-{dt}", f"mix_logits {label} [4096, 151936] {dt}"
            out += [Target(f"{c}-copy", f"{what}: share of copy bandwidth", c, "modkern",
                           "share", 0.80),
                    Target(f"{c}-compile", f"{what}: x torch.compile (logaddexp)", c,
                           "modkern", "speedup", 1.0, "compiled")]
    for dt in ("bf16", "fp32"):
        out.append(Target(f"decode-1-{dt}", f"decoding step, 1 row {dt}, CUDA graph replay "
                          "(float alpha)", f"decode-1-{dt}", "modkern-graph", "seconds", 15e-6))
    out.append(Target("decode-tensor-alpha", "decoding step, 1 row bf16, captured with a "
                      "tensor alpha", "decode-1-bf16", "modkern-graph-tensor-alpha", "runs"))
    return out


def _checkpoint_targets() -> list[Target]:
    what = "merge_checkpoints --device cuda, 2 x 2 GB"
    return [Target("ckpt-vs-cpu", f"{what}: time over the CPU merge", "ckpt-2gb",
                   "modkern-cuda", "ratio", 1.0, "modkern-cpu"),
            Target("ckpt-vs-read", f"{what}: time over reading BASE once", "ckpt-2gb",
                   "modkern-cuda", "ratio", 1.0, "read-base")]


TARGETS = _select_targets() + _mix_targets() + _checkpoint_targets()


def _find(rows: list[dict], case: str, impl: str) -> dict | None:
    found = [r for r in rows if r.get("case") == case and r.get("impl") == impl]
    return found[-1] if found else None


def _why_missing(row: dict | None, case: str, impl: str) -> str:
    if row is None:
        return f"no {impl} row for {case} (its stage failed, timed out or was skipped)"
    return row.get("error") or row.get("skipped") or f"{impl} row of {case} has no time"


def _measured(row: dict | None) -> bool:
    return row is not None and bool(row.get("seconds")) and not row.get("error")


def judge(t: Target, rows: list[dict]) -> dict:
    """The target's value and status: met, not met, or not measured (with the reason)."""
    row = _find(rows, t.case, t.impl)
    other_impl = {"share": "copy", "over_copy": "copy"}.get(t.kind, t.peer)
    other = _find(rows, t.case, other_impl) if other_impl else None
    result = {"id": t.id, "what": t.what, "status": "not measured", "value": None}
    for r, impl in ((row, t.impl), (other, other_impl)):
        if impl and not _measured(r):
            return {**result, "note": _why_missing(r, t.case, impl)}
    if t.kind == "runs":
        return {**result, "status": "met", "value": 1.0, "shown": "captured", "bar": "works"}
    value, bar, ok = _value(t, row, other)
    return {**result, "status": "met" if ok else "not met", "value": value, "shown":
            _shown(t.kind, value), "bar": bar}


def _value(t: Target, row: dict, other: dict | None) -> tuple[float, str, bool]:
    if t.kind == "share":
        v = row["gb_per_s"] / other["gb_per_s"]
        return v, f">= {t.bar:.0%}", v >= t.bar
    if t.kind == "over_copy":
        v = other["gb_per_s"] / row["gb_per_s"]
        return v, f"<= {t.bar:g}x", v <= t.bar
    if t.kind == "speedup":
        v = other["seconds"] / row["seconds"]
        return v, (f">= {t.bar:g}x" if t.bar > 1 else "> 1x (faster)"), (
            v >= t.bar if t.bar > 1 else v > t.bar)
    if t.kind == "ratio":
        v = row["seconds"] / other["seconds"]
        return v, f"<= {t.bar:g}x", v <= t.bar
    v = row["seconds"]  # seconds
    return v, f"<= {t.bar * 1e6:g} us", v <= t.bar


def _shown(kind: str, v: float) -> str:
    return {"share": f"{v:.0%}", "seconds": f"{v * 1e6:.1f} us"}.get(kind, f"{v:.2f}x")


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row cut short by a kill at the time limit
            continue
    return rows


_LOG_LINE = re.compile(r"(\S+::\S+).*?\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b|"
                       r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b\s+(\S+::\S+)")


def load_tests(xml: Path, log: Path) -> dict:
    """Counts and failures of the test pass, from its JUnit XML; from pytest -v's lines in
    the log when the XML is missing (the stage was killed)."""
    if xml.exists():
        try:
            return _junit_summary(ET.parse(xml).getroot())
        except ET.ParseError as e:
            note = f"JUnit XML unreadable ({e}); counted from the log"
    else:
        note = "no JUnit XML (the stage did not finish); counted from the log"
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    text = text.split("===== tests:", 1)[-1].split("\n===== ", 1)[0]
    seen: dict[str, str] = {}
    for m in _LOG_LINE.finditer(text):
        node, status = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        seen[node] = status
    counts = {k: sum(1 for s in seen.values() if s == k.upper())
              for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "source": "log", "note": note,
            "failures": [{"test": n, "message": s} for n, s in seen.items()
                         if s in ("FAILED", "ERROR")]}


def _junit_summary(root: ET.Element) -> dict:
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        kind = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(
            kinds[0] if kinds else "", "passed")
        counts[kind] += 1
        if kind in ("failed", "error"):
            child = case.find(kinds[0])
            msg = (child.get("message") or child.text or "").strip().splitlines()
            failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                             "message": (msg[0] if msg else "")[:300]})
    return {**counts, "source": "junit", "failures": failures}


def merge_bench_json(scratch: Path) -> dict:
    """pytest-benchmark's JSON files of the bench stages as one document."""
    merged: dict = {"benchmarks": []}
    for f in sorted(scratch.glob("bench-*.json")):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        merged.setdefault("machine_info", data.get("machine_info"))
        merged.setdefault("datetime", data.get("datetime"))
        merged["benchmarks"] += data.get("benchmarks", [])
    return merged


CSV_FIELDS = ["group", "case", "impl", "seconds", "bytes_floor", "gb_per_s", "share_of_copy",
              "device", "dtype", "shape", "rows", "V", "graph", "skipped", "error", "other"]


def with_shares(rows: list[dict]) -> list[dict]:
    """Each row with share_of_copy: its GB/s over its case's copy row's (when both exist)."""
    out = []
    for r in rows:
        copy = _find(rows, r.get("case"), "copy")
        share = (r["gb_per_s"] / copy["gb_per_s"] if r.get("gb_per_s") and copy
                 and copy.get("gb_per_s") else None)
        out.append({**r, "share_of_copy": share})
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            other = {k: v for k, v in r.items() if k not in CSV_FIELDS}
            w.writerow({**{k: r.get(k) for k in CSV_FIELDS[:-1]},
                        "other": json.dumps(other) if other else ""})


def write_all(out: Path, scratch: Path, *, stages: list[dict], dry_run: bool,
              budget_s: float, elapsed_s: float) -> list[str]:
    """Write every result file into `out` (the three report files always, whatever
    failed); return the problems check_outputs finds in them."""
    from gpu_markdown import markdown

    env_file = scratch / "env.json"
    try:
        machine = json.loads(env_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        machine = {"error": "the env stage left no readable env.json"}
    rows = with_shares(load_rows(scratch / "rows.jsonl"))
    tests = load_tests(scratch / "gpu_tests.xml", scratch / "gpu_check.log")
    results = {"dry_run": dry_run, "date": machine.get("date"), "machine": machine,
               "budget_s": budget_s, "elapsed_s": round(elapsed_s, 1), "stages": stages,
               "tests": tests, "targets": [judge(t, rows) for t in TARGETS], "rows": rows}
    (out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str),
                                          encoding="utf-8")
    (out / "gpu_results.md").write_text(markdown(results), encoding="utf-8")
    write_csv(rows, out / "gpu_bench.csv")
    (out / "gpu_bench.json").write_text(json.dumps(merge_bench_json(scratch)),
                                        encoding="utf-8")
    for name in ("gpu_tests.xml", "gpu_check.log"):
        if (scratch / name).exists():
            shutil.copyfile(scratch / name, out / name)
    return check_outputs(out)


def check_outputs(out: Path) -> list[str]:
    """What is wrong with a result folder: missing files, unreadable JSON, targets or
    rows without the fields the report promises. Empty when sane."""
    problems = [f"{name} is missing" for name in FILES if not (out / name).is_file()]
    if problems:
        return problems
    try:
        data = json.loads((out / "gpu_results.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return [f"gpu_results.json is not JSON: {e}"]
    for key in ("machine", "stages", "tests", "targets", "rows", "date"):
        if key not in data:
            problems.append(f"gpu_results.json has no {key!r}")
    for key in ("torch", "triton", "gpu"):
        if key not in data.get("machine", {}):
            problems.append(f"gpu_results.json: machine has no {key!r}")
    for t in data.get("targets", []):
        if t.get("status") not in ("met", "not met", "not measured"):
            problems.append(f"target {t.get('id')}: status {t.get('status')!r}")
        elif t["status"] == "not measured" and not t.get("note"):
            problems.append(f"target {t['id']}: not measured, without a reason")
    md = (out / "gpu_results.md").read_text(encoding="utf-8")
    problems += [f"gpu_results.md has no {h!r} section" for h in ("## Targets", "## Stages")
                 if h not in md]
    with open(out / "gpu_bench.csv", newline="", encoding="utf-8") as f:
        lines = list(csv.DictReader(f))
    if len(lines) != len(data.get("rows", [])):
        problems.append("gpu_bench.csv and gpu_results.json hold different rows")
    bad = [r for r in lines if r["seconds"] and not float(r["seconds"]) > 0]
    problems += [f"gpu_bench.csv: {r['case']} {r['impl']} has time {r['seconds']}" for r in bad]
    return problems
