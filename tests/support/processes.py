"""What the tests that drive real worker processes share: where the fault app lives, the
environment a child process gets, and waiting for a condition with a deadline."""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ROOT / "tests" / "integration" / "faults"
PRORCH = str(Path(sys.executable).parent / "prorch")


def fault_app() -> ModuleType:
    """The fault app module (tests/integration/faults/fault_app.py), as its workers import it."""
    sys.path.insert(0, str(FAULTS))
    try:
        return importlib.import_module("fault_app")
    finally:
        sys.path.remove(str(FAULTS))


def child_env(**more: str) -> dict[str, str]:
    """This process's environment without PRORCH_* settings, with the fault app and the project
    importable, plus ``more``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    return {**clean, "PYTHONPATH": os.pathsep.join([str(FAULTS), str(ROOT)]), **more}


def wait_for(condition: Callable[[], bool], seconds: float, what: str, poll: float = 0.05) -> None:
    """Return once ``condition()`` holds; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(poll)
