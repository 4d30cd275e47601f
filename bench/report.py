"""Turn a pytest-benchmark JSON file into the Markdown tables of the README.

    python bench/report.py results.json [more.json ...] > table.md

One table per benchmark group: each row's mean time, its achieved rate on the byte floor
it declares (extra_info "bytes_floor"), its speed relative to the group's eager-torch peer
(the row whose impl name contains "eager") and, where recorded, its peak memory
(extra_info "peak_mem_mb").
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
    with_memory = any("peak_mem_mb" in b["extra_info"] for b in benches)
    header = "| implementation | mean (ms) | floor (MB) | GB/s on floor | vs eager |"
    lines = [f"**{group}**", "", header + (" peak memory (MB) |" if with_memory else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if with_memory else "")]
    for b in sorted(benches, key=lambda b: b["stats"]["mean"]):
        info, mean = b["extra_info"], b["stats"]["mean"]
        floor = info.get("bytes_floor")
        cells = [info.get("impl", b["name"]), f"{mean * 1e3:.3f}",
                 f"{floor / 1e6:.1f}" if floor else "",
                 f"{floor / mean / 1e9:.2f}" if floor else "",
                 f"{base / mean:.1f}x" if base else ""]
        if with_memory:
            memory = info.get("peak_mem_mb")
            cells.append(f"{memory:.0f}" if memory is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    groups = rows_by_group(paths)
    print("\n\n".join(table(g, bs) for g, bs in groups.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
