"""The training's OpenMP wait policy (issue 26): importing sparc.train sets OMP_WAIT_POLICY=PASSIVE
unless the environment sets it, and the `train` command imports it before torch."""

import os
import subprocess
import sys


def run_python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_sparc_train_sets_passive_unless_set():
    show = "import os, sparc.train; print(os.environ['OMP_WAIT_POLICY'])"
    assert run_python(show) == "PASSIVE"
    assert run_python(show, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_the_train_command_imports_sparc_train_before_torch():
    # libgomp reads the variable when torch loads it: the CLI must not have imported torch yet
    assert run_python("import sys, sparc.cli; print('torch' in sys.modules)") == "False"
