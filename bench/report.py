"""Turn a pytest-benchmark JSON file into the Markdown tables of the README.

    python bench/report.py results.json [more.json ...] > table.md

One table per benchmark group: each row's mean time, its achieved rate on the byte floor
it declares (extra_info "bytes_floor", "gb_per_s"), and its speed relative to the group's
eager-torch peer (the row whose impl name contains "eager").
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def rows_by_group(paths: list[str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for bench in data["benchmarks"]:
            groups[bench["group"] or bench["name"]].append(bench)
    return groups


def table(group: str, benches: list[dict]) -> str:
    eager = [b for b in benches if "eager" in b["extra_info"].get("impl", "")]
    base = eager[0]["stats"]["mean"] if eager else None
    lines = [f"**{group}**", "",
             "| implementation | mean (ms) | floor (MB) | GB/s on floor | vs eager |",
             "|---|---:|---:|---:|---:|"]
    for b in sorted(benches, key=lambda b: b["stats"]["mean"]):
        info, mean = b["extra_info"], b["stats"]["mean"]
        floor = info.get("bytes_floor")
        speed = f"{base / mean:.1f}x" if base else ""
        lines.append(f"| {info.get('impl', b['name'])} | {mean * 1e3:.3f} | "
                     f"{floor / 1e6:.1f} | {info.get('gb_per_s', 0):.2f} | {speed} |"
                     if floor else
                     f"| {info.get('impl', b['name'])} | {mean * 1e3:.3f} | | | {speed} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    groups = rows_by_group(paths)
    print("\n\n".join(table(g, bs) for g, bs in groups.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
