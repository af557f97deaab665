"""Bad-input checks of the CUDA ops, run in a child process: on the H100 machine (torch 2.11) raising these errors
crashed the interpreter (segfault) in several runs, each time after many other tests in the same process (never
alone; cause not found). A crash must fail the one test, not the GPU test session.

A test file lists its cases as (call, message) and runs `expect_value_errors(cases)` when executed as a script; its
pytest test calls `run_as_child(__file__)`."""
import os
import subprocess
import sys
from typing import Callable, Sequence


def expect_value_errors(cases: Sequence[tuple[Callable[[], object], str]]) -> None:
    """Each call must raise ValueError whose message contains its text."""
    for call, msg in cases:
        print("case:", msg, flush=True)
        try:
            call()
        except ValueError as e:
            assert msg in str(e), (msg, str(e))
        else:
            raise AssertionError(f"no ValueError for {msg!r}")
    print("all bad inputs raised ValueError", flush=True)


def run_as_child(test_file: str) -> None:
    """Runs test_file as a script in a new interpreter, with the repository on PYTHONPATH; fails on a nonzero exit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    r = subprocess.run([sys.executable, os.path.abspath(test_file)], capture_output=True, text=True, timeout=600,
                       cwd=root, env=env)
    assert r.returncode == 0, f"child exited with {r.returncode}:\n{r.stdout}\n{r.stderr[-3000:]}"
