"""A service without Python uses the HTTP API: ``curl`` (a subprocess) starts a pipeline on a real
``prorch dashboard`` (uvicorn), sends it a message, and waits for its result by the long poll,
while a real ``prorch worker`` runs it on the same SQLite file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.dashboard import dashboard, running, shop_workdir

pytestmark = pytest.mark.slow
TOKEN = "svc-token-0123456789abcdef"
TOKENS = json.dumps({"shop-service": {"token": TOKEN, "scopes": ["start", "read", "act"], "names": ["Order"]}})


def curl(method: str, url: str, body: Any = None, token: str = TOKEN) -> tuple[int, Any]:
    """One request by curl: its status and JSON body."""
    args = ["curl", "-sS", "-X", method, "-H", f"Authorization: Bearer {token}", "-w", "\n%{http_code}", url]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=90, check=True)
    text, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(text)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_starts_a_pipeline_and_waits_for_its_result(tmp_path: Path) -> None:
    workdir = shop_workdir(tmp_path)
    with (
        dashboard(workdir, PRORCH_API_TOKENS=TOKENS) as (base, _),
        running(workdir, "worker", "--interval", "0.2"),
    ):
        api = base + "/api/v1"
        status, refused = curl("POST", api + "/pipelines/Order", {"params": {"item": "x"}}, token="wrong-token")
        assert status == 401 and refused["error"]["type"] == "ApiAuthError"
        status, created = curl("POST", api + "/pipelines/Order", {"params": {"item": "slowpoke", "qty": 2}})
        assert status == 201 and created["name"] == "Order", created
        uuid = created["uuid"]
        status, waiting = curl("GET", api + f"/pipelines/{uuid}/result?timeout=1")
        assert status == 202 and waiting["status"] == "pending"  # Ship waits for ship_now
        status, sent = curl("POST", api + f"/pipelines/{uuid}/send", {"name": "ship_now", "payload": {"by": "curl"}})
        assert status == 200 and sent["sent"] == "ship_now", sent
        for _ in range(3):  # a long poll of up to 30 s, asked again while the answer is 202
            status, answer = curl("GET", api + f"/pipelines/{uuid}/result?timeout=30")
            if status != 202:
                break
        assert status == 200 and answer["status"] == "finished", answer
        assert answer["result"] == {"tracking": f"TRK-{uuid[:6]}"}
