"""A real ``prorch dashboard`` process (and a real worker) over a SQLite store, for the
dashboard's API and browser tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.postgres import free_port

HERE = Path(__file__).resolve().parents[1] / "acceptance"
PRORCH = shutil.which("prorch", path=str(Path(sys.executable).parent)) or "prorch"


def shop_workdir(folder: Path) -> Path:
    """The acceptance tests' shop app with a SQLite store, as `prorch` finds it in its folder."""
    shutil.copy(HERE / "shop.py", folder / "shop.py")
    (folder / "prorch.toml").write_text('repository = "sqlite:///shop.db"\napp = ["shop"]\n')
    return folder


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRORCH_")}
    return {**env, **extra}


def prorch(workdir: Path, *args: str, **env: str) -> str:
    result = subprocess.run(
        [PRORCH, *args], cwd=workdir, env=environment(**env), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


@contextmanager
def running(workdir: Path, *args: str, **env: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [PRORCH, *args], cwd=workdir, env=environment(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def dashboard(
    workdir: Path, *args: str, token: str | None = None, **more_env: str
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``prorch dashboard`` on a free port; yields its base URL once it answers."""
    port = free_port()
    env = {"PRORCH_DASHBOARD_TOKEN": token, **more_env} if token else more_env
    with running(workdir, "dashboard", "--port", str(port), *args, **env) as process:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/api/overview", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"dashboard did not start: {process.communicate()[1]}") from None
                time.sleep(0.1)
        yield base, process
