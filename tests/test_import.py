"""`import modkern` needs neither a GPU nor triton (docs/design.md 3)."""

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    env_free = {"PATH": "/usr/bin:/bin"}  # no TRITON_INTERPRET
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env_free, timeout=120)


def test_import_without_triton_and_cpu_merge_works():
    result = _run("""
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import torch, modkern
        t1 = torch.tensor([0.0, 1.0, 2.0]); t2 = torch.tensor([5.0, 6.0, 7.0])
        assert modkern.mod_select(t1, t2, 0.6).tolist() == [0.0, 1.0, 7.0]
        assert "triton" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
        try:
            modkern.mod_select(t1, t2, 0.6, backend="triton")
        except modkern.BackendError as e:
            print("refused:", e)
    """)
    assert result.returncode == 0, result.stderr
    assert "refused: backend='triton' needs triton installed" in result.stdout


def test_import_does_not_load_triton_or_transformers():
    result = _run("""
        import sys, modkern
        print(sorted(m for m in ("triton", "transformers", "modkern.kernels") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_triton_on_cpu_without_interpreter_is_refused():
    result = _run("""
        import torch, modkern
        try:
            modkern.mod_select(torch.ones(3), torch.ones(3), 0.5, backend="triton")
        except modkern.BackendError as e:
            print("refused:", e)
    """)
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout
