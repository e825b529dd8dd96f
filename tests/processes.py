"""Real JAX processes from the repository root: several on localhost, joined as `--distributed` joins them
(parallel/distributed.py), or one with TensorFlow missing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_distributed(args: list[str], count: int = 2, timeout: float = 600) -> list[str]:
    """Runs `python ARGS --distributed` as `count` processes from the repository root; each process's stdout
    (asserting that every process exits 0)."""
    port = free_port()
    procs = []
    for index in range(count):
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="")
        env |= {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(count)}
        env["JAX_PROCESS_ID"] = str(index)
        procs.append(subprocess.Popen([sys.executable, *args, "--distributed"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


# Runs a script (`PATH ARGS`) or a module (`-m MODULE ARGS`) as __main__ with `import tensorflow` failing.
_WITHOUT_TENSORFLOW = """
import runpy, sys
sys.modules["tensorflow"] = None
args = sys.argv[1:]
if args[0] == "-m":
    sys.argv = args[1:]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
"""


def run_without_tensorflow(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` on the CPU as on a machine with JAX and no TensorFlow (a GPU or inference host): any import of
    TensorFlow fails. Returns the finished process, its output captured as text."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
