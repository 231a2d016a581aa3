"""Every runnable example in docs/examples runs and prints what its doc page says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

EXPECTED = {
    "versions.py": ["old v1 {'price': 100", "new v2 {'price': 90", "pinned v1 {'price': 100"],
    "plugins.py": ["acme ['Total: 120.00 EUR', 'PO: ACME-", "globex ['Total: 80.00 EUR']"],
    "messages.py": ["before: pending - due again at 2030-01-02", "after: finished {'approved_by': 'alice'}"],
    "reactions.py": ["emailing the customer about order", "notifications: 2"],
    "audit_log.py": [
        "status: finished",
        "audit: Payment pipeline.started -",
        "audit: Payment step.finished Receipt",
        "audit: Payment pipeline.finished -",
    ],
    "async_hooks.py": [
        "finished 20 of 20 in one pass; hooks awaiting at once, at most: 20",
        "first output: {'job': 'job-0'}",
        "Stuck was cancelled after its timeout",
        "Hangs: failed - HookTimeoutError",
    ],
    "children.py": [
        "children: ['pending', 'pending']",
        "album: finished {'thumbs': ['a-small.jpg', 'b-small.jpg']}",
    ],
    "limits.py": [
        "first pass: [1, 4, 5]",
        "same minute: [1, 4, 5]",
        "a minute later: [1, 2, 4, 5, 6]",
        "then: [1, 2, 3, 4, 5, 6]",
    ],
    "retention.py": ["would purge: 5", "purged 5 in 3 batches; left: 1"],
    "schedules.py": [
        "first pass created: 1",
        "again, same night: 0",
        "after three nights: 3",
        "2026-11-26 finished {'report': 'sales-2026-11-26.pdf'}",
    ],
    "rerun.py": [
        "first: failed",
        "rerun: finished {'loaded': 3, 'into': 'sales'}",
        "forked from: {'uuid': '",
    ],
    "patches.py": [
        "before [] {'total': 3}",
        "after ['fix-rounding'] {'total': 3.33}",
        "old worker: this pipeline was created with patch(es) 'fix-rounding', which this code does not declare",
        "new worker: {'total': 3.33}",
        "deprecated: this pipeline predates patch(es) 'fix-rounding', deprecated in this code",
        "versions: Billing v1: 1 live, 3 ended; fix-rounding: 0 live with it, 1 predating it",
    ],
    "replay.py": [
        "deployed code: replayed 2 pipeline(s) against the code loaded: ok",
        "changed code: fails",
        "Order v1 (pending), step Ship: step: recorded step Ship v1 no longer loads",
        "2 would not run as recorded",
    ],
    "schemas.py": ["rejected: invalid params for pipeline Thumbnail: image: Field required", "bad: width"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / name)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for expected in EXPECTED[name]:
        assert expected in done.stdout, done.stdout


def test_every_example_is_checked() -> None:
    examples = {p.name for p in (ROOT / "docs" / "examples").glob("*.py") if not p.name.startswith("_")}
    assert examples - {"sqlite3_repository.py"} == set(EXPECTED)  # sqlite3_repository: the contract suite


def test_the_tutorials_code_runs(tmp_path: Path) -> None:
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "tutorial.md").read_text(), re.S)
    (tmp_path / "trial.py").write_text(blocks[0])
    (tmp_path / "test_trial.py").write_text(blocks[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_trial.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
