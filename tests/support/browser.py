"""Programs from Debian's packages that tests drive for real: Chromium for the browser tests
(through playwright's ``executable_path``: browsers cannot be downloaded here) and the
Prometheus server that scrapes a worker. Installed with apt when missing and running as root,
as tests/support/postgres.py does for PostgreSQL; skipped locally, failed in CI, when absent."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def find(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def debian_program_or_skip(names: tuple[str, ...], package: str) -> str:
    """The program's path, installing Debian's ``package`` as root when it is missing."""
    found = find(names)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        install = ["apt-get", "install", "-y", "-qq", package]
        subprocess.run(install, check=False, env=env, capture_output=True)
        found = find(names)
    if found is None:
        message = f"{names[0]} is not installed (apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def chromium_or_skip() -> str:
    return debian_program_or_skip(("chromium", "chromium-browser"), "chromium")


def prometheus_or_skip() -> str:
    return debian_program_or_skip(("prometheus",), "prometheus")
