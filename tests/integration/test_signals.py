"""SIGTERM while the worker's main thread waits on its stop event, again and again (the worker
loop does so between hooks): the handler must not take a lock that thread holds."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SPIN = textwrap.dedent(
    """
    import threading
    from prorch import signals

    stop = threading.Event()
    signals.stop_on_signals(stop.set, stop.is_set, 30.0)
    print("ready", flush=True)
    while not stop.is_set():
        stop.wait(0)  # in and out of the event's lock, as the worker loop between hooks
    print("stopped", flush=True)
    """
)


@pytest.mark.slow
def test_sigterm_during_a_wait_on_the_stop_event_never_deadlocks(tmp_path: Path) -> None:
    """Regression: the handler called ``Event.set()`` in the main thread, which could be inside
    that event's ``wait`` holding its lock: the worker hung for good after SIGTERM (seen as a
    worker that did not exit 30 s after SIGTERM, about 1 run in 10 of four workers)."""
    script = tmp_path / "spin.py"
    script.write_text(SPIN)
    for attempt in range(60):
        process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise AssertionError(f"attempt {attempt}: the process hung after SIGTERM") from None
        assert process.returncode == 0 and out == "stopped\n", (attempt, process.returncode, out)
