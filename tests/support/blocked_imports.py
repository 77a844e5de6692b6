"""Run a snippet in a fresh interpreter where some top-level packages cannot be imported.

``run_blocking({"openai"}, "import grounded_sd.pipeline")`` installs a meta-path finder that
raises ``ImportError`` for the blocked names before the snippet runs, so the snippet succeeds
only if nothing it imports needs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_HOOK = """
import sys
BLOCKED = {blocked!r}

class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, _Refuse())
"""


def run_blocking(blocked: set[str], code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` with ``blocked`` packages unimportable; stdout and stderr are captured as text."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = _HOOK.format(blocked=sorted(blocked)) + code
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_runs_blocking(blocked: set[str], code: str) -> None:
    """``code`` runs to its end with ``blocked`` unimportable, and has not imported any of them."""
    check = f"\nimport sys\nassert not set(sys.modules) & {set(blocked)!r}\nprint('ran to the end')\n"
    result = run_blocking(blocked, code + check)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ran to the end")
