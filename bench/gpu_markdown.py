"""gpu_results.md: bench/gpu_check.py's results (see gpu_report.py) as Markdown."""

from __future__ import annotations


def _time(seconds: float | None) -> str:
    if not seconds:
        return ""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _machine(m: dict) -> list[str]:
    if "error" in m:
        return [f"Machine: unknown ({m['error']})."]
    bw = m.get("copy_gb_per_s")
    lines = [f"- GPU: {m.get('gpu')}"
             + (f", {m['sm_count']} SMs, {m['gpu_memory_gb']} GB, compute capability "
                f"{m['capability']}" if m.get("sm_count") else ""),
             f"- torch {m.get('torch')} (CUDA {m.get('cuda')}), triton {m.get('triton')}, "
             f"transformers {m.get('transformers')}, Python {m.get('python')}; "
             f"pytest-benchmark {m.get('pytest_benchmark')}, pytest-xdist {m.get('xdist')}",
             f"- modkern {m.get('modkern')} at commit {m.get('git_commit')}; modkern.kernels "
             f"{m.get('modkern_kernels')}"]
    if bw:
        lines.append(f"- device-to-device copy, 2 GiB read + 2 GiB written: {bw:.0f} GB/s")
    return lines


def _stages(stages: list[dict]) -> list[str]:
    lines = ["| stage | status | seconds | limit (s) | note |", "|---|---|---:|---:|---|"]
    for s in stages:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} | "
                     f"{s.get('limit_s', '')} | {s.get('error', '')} |")
    return lines


def _tests(t: dict) -> list[str]:
    lines = [f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
             f"{t.get('error', 0)} errors, {t.get('skipped', 0)} skipped "
             f"(from {t.get('source')})." + (f" {t['note']}." if t.get("note") else "")]
    failures = t.get("failures", [])
    lines += [f"- `{f['test']}`: {f['message']}" for f in failures[:40]]
    if len(failures) > 40:
        lines.append(f"- ... and {len(failures) - 40} more (gpu_tests.xml)")
    return lines


def _targets(targets: list[dict]) -> list[str]:
    lines = ["| target | measured | bar | status | note |", "|---|---:|---|---|---|"]
    for t in targets:
        mark = {"met": "met", "not met": "**not met**"}.get(t["status"], t["status"])
        lines.append(f"| {t['what']} | {t.get('shown', '')} | {t.get('bar', '')} | {mark} | "
                     f"{t.get('note', '')} |")
    return lines


def _groups(rows: list[dict]) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("group") or str(r.get("case")), []).append(r)
    lines: list[str] = []
    for name, members in groups.items():
        base = next((r for r in members if r["impl"].startswith("modkern") and
                     r.get("seconds") and not r.get("error")), None)
        lines += ["", f"**{name}**", "",
                  "| implementation | time | floor (MB) | GB/s on floor | share of copy | "
                  "modkern's speed-up over it |", "|---|---:|---:|---:|---:|---:|"]
        for r in members:
            if not r.get("seconds") or r.get("error"):
                lines.append(f"| {r['impl']} | {r.get('error') or r.get('skipped')} | | | | |")
                continue
            floor, share = r.get("bytes_floor"), r.get("share_of_copy")
            gbs = floor / r["seconds"] / 1e9 if floor else None
            lines.append(" | ".join([
                f"| {r['impl']}", _time(r["seconds"]), _num(floor / 1e6) if floor else "",
                _num(gbs) if gbs else "", f"{share:.0%}" if share else "",
                f"{r['seconds'] / base['seconds']:.3g}x" if base else ""]) + " |")
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    title = f"# GPU check: {m.get('gpu', 'unknown device')}, {results.get('date')}"
    lines = [title, ""]
    if results["dry_run"]:
        lines += ["**Dry run** on the CPU (tiny shapes, Triton interpreted): these figures "
                  "check the plumbing, they are not GPU figures.", ""]
    lines += _machine(m) + ["", f"Budget {results['budget_s']:.0f} s, elapsed "
                                f"{results['elapsed_s']:.0f} s.", "", "## Stages", ""]
    lines += _stages(results["stages"]) + ["", "## Tests (the CUDA pass)", ""]
    lines += _tests(results["tests"]) + ["", "## Targets (docs/design.md 4)", ""]
    lines += _targets(results["targets"]) + ["", "## Figures", "",
                                             "Median of CUDA-event timings per row (the "
                                             "checkpoint rows: one cold run each, host "
                                             "clock); share of copy = GB/s on the floor over "
                                             "a device copy of the same bytes, measured in "
                                             "the same run."]
    lines += _groups(results["rows"])
    return "\n".join(lines) + "\n"
