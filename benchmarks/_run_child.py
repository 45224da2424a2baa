"""How a benchmark measures in a child process of its own: the child prints one ``RESULT``
line of JSON (:func:`print_result`), the parent runs it and reads that line (:func:`run_child`),
so that each method's peak memory and CPU time are its own."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

PREFIX = "RESULT "


def print_result(out: Mapping[str, Any]) -> None:
    print(PREFIX + json.dumps(out), flush=True)


def run_child(script: str, args: Sequence[str], what: str,
              env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``python script args...``'s result; exits with the child's output if it failed."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          check=False, env=None if env is None else dict(env))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len(PREFIX):])
