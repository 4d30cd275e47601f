"""One prepared GPU check (docs/design.md 4): the CUDA test pass, the GPU benchmarks and a report,
in one command, within a fixed time budget.

    python -m pip install --no-deps --no-build-isolation -e .    # once, on the GPU machine
    python bench/gpu_check.py --out DIR                          # ~5 minutes on an H200
    python bench/gpu_check.py --out DIR --dry-run                # the same on the CPU: tiny
                                                                 # shapes, Triton interpreted

Stages, in order, each a subprocess with its own time limit cut to what is left of the budget
(a failure or time-out in one leaves the others' results and a clear line in the report):
    install       only when modkern.kernels does not import: the pip line above, offline
    env           GPU, versions, date, a large device copy (the bandwidth yardstick)
    bench         bench_gpu_select.py + bench_gpu_mix.py without the torch.compile peers
    tensor-alpha  the decoding step captured in a CUDA graph with a tensor alpha (guarded:
                  its own process, so a failed capture cannot spoil the other rows)
    tests         the CUDA test pass: the device-parametrised tests (tests/conftest.py's
                  `device` fixture is "cuda" there) and tests/test_gpu_paths.py
    checkpoint    bench_gpu_checkpoint.py: a 2 x 2 GB merge, GPU against CPU and the floors
    compile       the torch.compile peers (their warm-up is slow: last, with what is left)
DIR receives gpu_results.md, gpu_results.json, gpu_bench.csv (the report: bench/gpu_report.py),
gpu_bench.json (pytest-benchmark's JSON of every bench stage), gpu_tests.xml (JUnit) and
gpu_check.log (every stage's output). Exit status 0 when every stage ran clean, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_report  # noqa: E402

GPU_BENCH = ["bench/bench_gpu_select.py", "bench/bench_gpu_mix.py"]
CUDA_TESTS = ["tests/test_select_oracle.py", "tests/test_select_handworked.py",
              "tests/test_select_errors.py", "tests/test_select_properties.py",
              "tests/test_merge_batched.py", "tests/test_merge_state_dicts.py",
              "tests/test_mix_logits.py", "tests/test_mix_logits_grad.py",
              "tests/test_mix_logits_kernels.py", "tests/test_gpu_paths.py",
              "tests/test_hostile_tensors.py", "tests/test_merge_inplace_atomic.py"]
# Left out (node id prefixes): the PTX-only compile check (a GPU compiles for real), and the
# Triton variants of three tests that build CPU tensors: with a GPU present the interpreter is
# off, so backend="triton" on CPU tensors is refused, as it should be. Their device
# counterpart is tests/test_gpu_paths.py::test_merge_state_dicts_on_device.
DESELECT = ["tests/test_mix_logits_kernels.py::test_kernels_compile_for_a_gpu",
            "tests/test_merge_state_dicts.py::test_precision_reaches_every_tensor[triton",
            "tests/test_merge_state_dicts.py::test_inplace_tied_weights_match_out_of_place[triton",
            "tests/test_merge_state_dicts.py::test_merge_stats_counts[triton"]
# The dry run checks the plumbing with a few of the new tests, interpreted.
DRY_TESTS = ["tests/test_gpu_paths.py", "-k",
             "every_mode and bf16-exact or layouts and bf16-3x3000"]

# name, seconds allowed on a GPU, in the dry run, and the least worth starting with
STAGES = [("env", 30, 30, 5), ("bench", 100, 60, 20), ("tensor-alpha", 30, 30, 10),
          ("tests", 130, 90, 30), ("checkpoint", 60, 60, 20), ("compile", 120, 60, 30)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for the results (created)")
    p.add_argument("--dry-run", action="store_true",
                   help="run on the CPU: tiny shapes, Triton kernels interpreted")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all stages together (default 330; dry run 240)")
    p.add_argument("--skip", default="", help="comma-separated stages to leave out, "
                   f"of: {', '.join(s[0] for s in STAGES)}")
    p.add_argument("--compile", action="store_true",
                   help="dry run: keep the torch.compile peers (slow on a CPU)")
    p.add_argument("--env-json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.env_json and args.out is None:
        p.error("--out DIR is required")
    unknown = set(filter(None, args.skip.split(","))) - {s[0] for s in STAGES}
    if unknown:
        p.error(f"--skip: unknown stage(s) {sorted(unknown)}")
    return args


def environment() -> dict:
    """What the figures were measured on, and the copy bandwidth of a large copy."""
    import datetime
    import platform

    import torch
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for name in ("triton", "transformers", "safetensors", "pytest_benchmark", "xdist"):
        env[name] = _version(name)
    env["git_commit"] = _git_commit()
    import modkern
    env["modkern"] = modkern.__version__
    try:
        import modkern.kernels  # noqa: F401  (mapped from kernels/ by `pip install -e .`)
        env["modkern_kernels"] = "importable"
    except ImportError as e:
        env["modkern_kernels"] = f"NOT importable ({e}): pip install --no-deps -e ."
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   gpu_memory_gb=round(props.total_memory / 1e9, 1),
                   capability=f"{props.major}.{props.minor}")
        n = 2 << 30  # 2 GiB read + 2 GiB written
        src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        from _common import device_seconds
        env["copy_gb_per_s"] = 2 * n / device_seconds(lambda: dst.copy_(src)) / 1e9
    else:
        env["gpu"] = f"none (CPU: {platform.processor() or platform.machine()}, " \
                     f"{os.cpu_count()} cores)"
    return env


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    from importlib import metadata
    dist = {"xdist": "pytest-xdist", "pytest_benchmark": "pytest-benchmark"}.get(module, module)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown (no git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


class Run:
    """One check: the budget, the scratch folder, the log, and each stage's outcome."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args, self.scratch = args, scratch
        self.budget = args.budget or (240.0 if args.dry_run else 330.0)
        self.start = time.time()
        self.log = scratch / "gpu_check.log"
        self.rows = scratch / "rows.jsonl"
        self.stages: list[dict] = []

    def env(self, deadline: float) -> dict:
        base = {**os.environ, "PYTHONUNBUFFERED": "1", "MODKERN_BENCH_ROWS": str(self.rows),
                "MODKERN_GPU_DEADLINE": str(deadline)}
        if self.args.dry_run:
            base.update(MODKERN_GPU_DRY_RUN="1", MODKERN_BENCH_SMALL="1", TRITON_INTERPRET="1",
                        CUDA_VISIBLE_DEVICES="")
            if self.args.compile:
                base["MODKERN_BENCH_COMPILE"] = "1"
        return base

    def stage(self, name: str, cmd: list[str], cap: float, least: float) -> dict:
        """Run one stage's command with its time limit (cap, cut to the budget left);
        record and return its outcome."""
        left = self.budget - (time.time() - self.start)
        limit = min(cap, left)
        outcome = {"name": name, "status": "skipped", "seconds": 0.0, "limit_s": round(limit)}
        if name in self.args.skip.split(","):
            outcome["error"] = "left out with --skip"
        elif limit < least:
            outcome["error"] = f"skipped: {max(left, 0):.0f} s of the budget left, needs {least} s"
        else:
            started = time.time()
            try:
                outcome.update(run_command(cmd, limit, self.env(started + limit - 8),
                                           self.log, name))
            except BaseException:  # SIGTERM or Ctrl-C: record the stage, then stop
                self.stages.append({**outcome, "status": "killed",
                                    "seconds": time.time() - started,
                                    "error": "the check itself was stopped during this stage"})
                raise
        self.stages.append(outcome)
        print(f"[gpu_check] {name}: {outcome['status']} ({outcome['seconds']:.0f} s)"
              + (f" - {outcome['error']}" if outcome.get("error") else ""), flush=True)
        return outcome


def run_command(cmd: list[str], limit: float, env: dict, log: Path, name: str) -> dict:
    """Run cmd from the repository root, appending its output to log; kill its whole process
    group at the time limit. Returns status ok / failed / timeout, seconds and an error."""
    start = time.time()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n===== {name}: {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out.write(f"\n===== {name}: killed at its time limit of {limit:.0f} s\n")
            return {"status": "timeout", "seconds": time.time() - start,
                    "error": f"timed out after {limit:.0f} s (results up to then are kept)"}
        finally:
            _kill_group(proc)  # helpers it left behind (compile workers, test workers)
    seconds = time.time() - start
    if rc == 0:
        return {"status": "ok", "seconds": seconds}
    what = {1: "some tests or rows failed", 5: "nothing was collected"}.get(rc, "error")
    return {"status": "failed", "seconds": seconds, "rc": rc,
            "error": f"exit status {rc} ({what}); see gpu_check.log"}


def _kill_group(proc: subprocess.Popen) -> None:
    """End the stage's process group (it has its own session): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # nothing of the group is left
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.2)  # let other members of the group act on the signal


def pytest_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]


def bench_cmd(run: Run, files: list[str], select: str | None, json_name: str) -> list[str]:
    """pytest over GPU suites; `select` a -k expression over the rows' ids."""
    return pytest_cmd(*files, *(["-k", select] if select else []), "-rfEs",
                      f"--benchmark-json={run.scratch / json_name}")


def tests_cmd(run: Run) -> list[str]:
    xml = f"--junitxml={run.scratch / 'gpu_tests.xml'}"
    if run.args.dry_run:
        return pytest_cmd(*DRY_TESTS, "-v", "-rfE", xml)
    files = [f for f in CUDA_TESTS if (ROOT / f).exists()]
    extra = [f"--deselect={d}" for d in DESELECT]
    if importlib.util.find_spec("xdist"):  # Triton compiles each kernel variant: use cores
        extra += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    if importlib.util.find_spec("pytest_timeout"):
        extra += ["--timeout=120"]
    return pytest_cmd(*files, *extra, "-v", "-rfE", "--tb=short", xml)


def kernels_importable() -> bool:
    """Whether modkern.kernels imports in a fresh interpreter (it needs `pip install -e .`:
    setup.py maps the kernels/ folder into the package)."""
    probe = subprocess.run([sys.executable, "-c", "import modkern.kernels"], cwd=ROOT,
                           capture_output=True, timeout=120)
    return probe.returncode == 0


def run_stages(run: Run) -> None:
    by_name = {s[0]: s for s in STAGES}
    if not kernels_importable():  # install in place, offline, then go on either way
        run.stage("install", [sys.executable, "-m", "pip", "install", "--no-deps",
                              "--no-build-isolation", "-e", str(ROOT)], 120, 10)

    def limits(name):
        _, gpu, dry, least = by_name[name]
        return (dry if run.args.dry_run else gpu), least

    env_json = run.scratch / "env.json"
    run.stage("env", [sys.executable, str(Path(__file__)), "--env-json", "--out",
                      str(env_json)], *limits("env"))
    run.stage("bench", bench_cmd(run, GPU_BENCH, "not compiled and not tensor",
                                 "bench-core.json"), *limits("bench"))
    run.stage("tensor-alpha", bench_cmd(run, ["bench/bench_gpu_mix.py"], "tensor",
                                        "bench-alpha.json"), *limits("tensor-alpha"))
    run.stage("tests", tests_cmd(run), *limits("tests"))
    run.stage("checkpoint", bench_cmd(run, ["bench/bench_gpu_checkpoint.py"], None,
                                      "bench-checkpoint.json"), *limits("checkpoint"))
    if run.args.dry_run and not run.args.compile:
        run.stages.append({"name": "compile", "status": "skipped", "seconds": 0.0,
                           "error": "the dry run leaves torch.compile out (--compile keeps it)"})
    else:
        run.stage("compile", bench_cmd(run, GPU_BENCH, "compiled", "bench-compile.json"),
                  *limits("compile"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.env_json:  # the env stage, in its own process
        args.out.write_text(json.dumps(environment(), indent=1))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    # killed from outside (e.g. `timeout`): end the stage in flight, still write the report
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="modkern-gpu-check-") as tmp:
        run = Run(args, Path(tmp))
        try:
            run_stages(run)
        finally:
            problems = gpu_report.write_all(args.out, run.scratch, stages=run.stages,
                                            dry_run=args.dry_run, budget_s=run.budget,
                                            elapsed_s=time.time() - run.start)
    for p in problems:
        print(f"[gpu_check] report: {p}", file=sys.stderr)
    print(f"[gpu_check] wrote {args.out}/gpu_results.md, .json, gpu_bench.csv "
          f"in {time.time() - run.start:.0f} s", flush=True)
    clean = all(s["status"] in ("ok", "skipped") for s in run.stages)
    return 0 if clean and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
