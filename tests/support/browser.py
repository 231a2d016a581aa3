"""Debian's Chromium for the dashboard's browser tests, driven by playwright through
``executable_path`` (browsers cannot be downloaded here). Installed with apt when missing and
running as root, as tests/support/postgres.py does for PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

CANDIDATES = ("chromium", "chromium-browser")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_or_skip() -> str:
    """The browser's path; installs Debian's ``chromium`` as root; skips locally, fails in CI."""
    found = find_chromium()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, env=env, capture_output=True)
        found = find_chromium()
    if found is None:
        message = "Chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found
