"""The dashboard's JSON API and its guards, against a real `prorch dashboard` process over a
real SQLite store: read-only without a token, bearer tokens for API actions, sessions with CSRF
tokens for the pages' forms, one clear error for bad filters, and no secrets in its pages."""

from __future__ import annotations

import http.cookiejar
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from prorch import Orchestrator
from prorch.model.workers import WorkerRow
from tests.support.dashboard import dashboard, prorch, running, shop_workdir
from tests.support.processes import wait_for

TOKEN = "dash-s3cret-token"


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(url: str, body: Any = None, headers: dict[str, str] | None = None, form: bool = False) -> tuple[int, str]:
    data = urllib.parse.urlencode(body or {}).encode() if form else json.dumps(body or {}).encode()
    kind = "application/x-www-form-urlencoded" if form else "application/json"
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": kind, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Path, list[str]]:
    workdir = shop_workdir(tmp_path)
    uuids = [prorch(workdir, "start", "Order", "-p", f"item=i{n}", "-p", f"qty={n}").strip() for n in range(3)]
    uuids.append(prorch(workdir, "start", "Order", "-p", "item=slowpoke", "--tenant", "acme").strip())
    prorch(workdir, "run")
    return workdir, uuids


def test_api_serves_what_the_pages_show(shop: tuple[Path, list[str]]) -> None:
    workdir, uuids = shop
    with dashboard(workdir) as (base, _):
        status, overview = get(base + "/api/overview")
        assert status == 200
        assert overview["by_status"]["finished"] == 3 and overview["by_status"]["pending"] == 1
        assert overview["waiting"] == 1 and overview["blocked"] == 0
        assert sum(minute["finished"] for minute in overview["last_hour"]) == 3
        status, page = get(base + "/api/pipelines?status=finished&limit=2")
        assert status == 200 and page["total"] == 3 and len(page["pipelines"]) == 2
        status, rest = get(base + f"/api/pipelines?status=finished&limit=2&after={page['next_after']}")
        assert [p["uuid"] for p in rest["pipelines"]] == [uuids[0]] and rest["next_after"] is None
        status, by_param = get(base + "/api/pipelines?param=qty%3D2")
        assert [p["uuid"] for p in by_param["pipelines"]] == [uuids[2]]
        status, one = get(base + f"/api/pipelines/{uuids[3]}")
        assert one["pipeline"]["tenant"] == "acme" and one["next_run"]["reason"].startswith("waiting")
        ship = one["steps"][2]
        assert ship["progress"]["note"] == "in transit" and ship["max_attempts"] == 1
        assert get(base + "/api/pipelines?since=yesterday")[0] == 400
        status, missing = get(base + "/api/pipelines/00000000-0000-0000-0000-000000000000")
        assert status == 404 and "no pipeline with uuid" in missing["error"]


def test_without_a_token_the_dashboard_is_read_only(shop: tuple[Path, list[str]]) -> None:
    workdir, uuids = shop
    with dashboard(workdir, "--host", "0.0.0.0") as (base, process):
        status, body = post(base + f"/api/pipelines/{uuids[3]}/cancel", headers={"Authorization": "Bearer x"})
        assert status == 403 and "read-only" in body
        status, body = post(base + f"/pipelines/{uuids[3]}/cancel", {"csrf": "x"}, form=True)
        assert status == 403 and "PRORCH_DASHBOARD_TOKEN" in body
        assert get(base + f"/api/pipelines/{uuids[3]}")[1]["pipeline"]["status"] == "pending"
    assert process.stderr is not None
    assert "warning: listening on 0.0.0.0 without a token" in process.stderr.read()


def test_actions_need_the_token_and_are_logged(shop: tuple[Path, list[str]]) -> None:
    workdir, uuids = shop
    with dashboard(workdir, token=TOKEN) as (base, process):
        target = f"{base}/api/pipelines/{uuids[3]}"
        assert post(target + "/cancel", headers={"Authorization": "Bearer wrong"})[0] == 403
        assert post(target + "/cancel")[0] == 403
        status, body = post(target + "/send", {"name": "go", "payload": {"n": 1}}, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["done"] == "sent go"
        # the pages' forms: a session from the login, and the CSRF token of that session
        assert post(f"{target.replace('/api', '')}/cancel", {"csrf": ""}, form=True)[0] == 403
        assert post(base + "/login", {"token": "wrong"}, form=True)[0] == 403
        status, body = post(target + "/cancel", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["pipeline"]["status"] == "cancelled"
        for page in ("/", "/pipelines", f"/pipelines/{uuids[3]}"):
            with urllib.request.urlopen(base + page, timeout=10) as response:
                assert TOKEN not in response.read().decode()
    assert process.stderr is not None
    log = process.stderr.read()
    assert f"dashboard: API cancel {uuids[3]} by 127.0.0.1" in log
    assert "dashboard: refused API cancel" in log and TOKEN not in log


def test_forms_need_the_session_and_its_csrf_token(shop: tuple[Path, list[str]]) -> None:
    workdir, uuids = shop
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def submit(url: str, fields: dict[str, str]) -> tuple[int, str]:
        try:
            with browser.open(url, data=urllib.parse.urlencode(fields).encode(), timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    with dashboard(workdir, token=TOKEN) as (base, _):
        status, _ = submit(base + "/login", {"token": TOKEN, "next": "//evil.example/steal"})
        assert status == 200 and browser.open(base + "/", timeout=10).geturl() == base + "/"  # no open redirect
        assert any(cookie.name == "prorch_session" and TOKEN not in cookie.value for cookie in jar)
        status, body = submit(f"{base}/pipelines/{uuids[3]}/cancel", {"csrf": "forged"})
        assert status == 403 and "log in with the dashboard token" in body
        page = browser.open(f"{base}/pipelines/{uuids[3]}", timeout=10).read().decode()
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        assert csrf is not None
        # the send form with its payload left empty: a message carrying True (it stored null,
        # which receive() returned as no message); null itself is refused, nothing stored
        form = f"{base}/pipelines/{uuids[3]}/send"
        status, body = submit(form, {"csrf": csrf.group(1), "name": "go", "payload": ""})
        assert status == 200, body
        status, body = submit(form, {"csrf": csrf.group(1), "name": "go", "payload": "null"})
        assert status == 400 and "leave the payload out" in body
        api = f"{base}/api/pipelines/{uuids[3]}/send"
        assert post(api, {"name": "bare"}, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert post(api, {"name": "bare", "payload": None}, {"Authorization": f"Bearer {TOKEN}"})[0] == 400
        messages = Orchestrator(f"sqlite:///{workdir / 'shop.db'}").store.messages_of(uuids[3])
        assert [(m.name, m.payload) for m in messages] == [("go", True), ("bare", True)]
        status, body = submit(f"{base}/pipelines/{uuids[3]}/cancel", {"csrf": csrf.group(1)})
        assert status == 200 and "Yes, cancel" in body  # the confirm step: nothing done yet
        assert get(f"{base}/api/pipelines/{uuids[3]}")[1]["pipeline"]["status"] == "pending"
        status, body = submit(f"{base}/pipelines/{uuids[3]}/cancel", {"csrf": csrf.group(1), "confirm": "yes"})
        assert status == 200 and 'id="status">cancelled<' in body


def test_stored_values_are_escaped_in_pages(tmp_path: Path) -> None:
    workdir = shop_workdir(tmp_path)
    uuid = prorch(workdir, "start", "Order", "-p", "item=<script>alert(1)</script>").strip()
    with dashboard(workdir) as (base, _):
        page = urllib.request.urlopen(f"{base}/pipelines/{uuid}", timeout=10).read().decode()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


FAMILY = """
from prorch import OnContinueMixin, OnStartMixin, Pipeline, Step, register_pipeline, register_step

@register_step
class Kid(OnStartMixin, Step):
    name = "Kid"

    def on_start(self):
        self.finish({"n": self.params["n"]})

@register_pipeline
class Child(Pipeline):
    name = "Child"
    steps = [Kid]

@register_step
class Raise(OnStartMixin, OnContinueMixin, Step):
    name = "Raise"

    def on_start(self):
        self.metadata["kids"] = [self.start_child(Child, {"n": n}, key=str(n)) for n in (1, 2)]

    def on_continue(self):
        results = [self.child_result(kid) for kid in self.metadata["kids"]]
        if None in results:
            self.wait(seconds=3600)
        else:
            self.finish({"sum": sum(r["n"] for r in results)})

@register_pipeline
class Parent(Pipeline):
    name = "Parent"
    steps = [Raise]
"""


def test_parents_children_and_results_are_shown(tmp_path: Path) -> None:
    (tmp_path / "family.py").write_text(FAMILY)
    (tmp_path / "prorch.toml").write_text('repository = "sqlite:///family.db"\napp = ["family"]\n')
    parent = prorch(tmp_path, "start", "Parent").strip()
    for _ in range(3):
        prorch(tmp_path, "run")
    shown = prorch(tmp_path, "show", parent)
    assert "children:" in shown and shown.count("  Child  finished") == 2
    with dashboard(tmp_path) as (base, _):
        data = get(f"{base}/api/pipelines/{parent}")[1]
        assert data["result"] == {"sum": 3} and [c["status"] for c in data["children"]] == ["finished"] * 2
        child = data["children"][0]["uuid"]
        assert get(f"{base}/api/pipelines/{child}")[1]["pipeline"]["parent_uuid"] == parent
        page = urllib.request.urlopen(f"{base}/pipelines/{parent}", timeout=10).read().decode()
        assert 'id="children"' in page and f'href="/pipelines/{child}"' in page and "&#34;sum&#34;: 3" in page
        page = urllib.request.urlopen(f"{base}/pipelines/{child}", timeout=10).read().decode()
        assert f'href="/pipelines/{parent}" id="parent"' in page


def test_a_held_request_does_not_hold_the_others(shop: tuple[Path, list[str]], tmp_path: Path) -> None:
    """The store is synchronous: a route that queried it on the event loop stopped every other
    request until it returned. A cancel whose ``on_cancel`` waits for the test's word (its hook
    writes ``hold.end`` when it returns) holds one request; the overview, a pipeline, the list and
    a page are each answered while that hook is still waiting."""
    workdir, uuids = shop
    hold = tmp_path / "hold"
    started, ended, release = (Path(f"{hold}.{suffix}") for suffix in ("start", "end", "release"))
    answered: list[str] = []
    with dashboard(workdir, token=TOKEN, SHOP_CANCEL_HOLD=str(hold)) as (base, _):

        def cancel() -> None:
            url = base + f"/api/pipelines/{uuids[3]}/cancel"
            request = urllib.request.Request(
                url, data=b"{}", method="POST", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                body = json.loads(response.read())
            answered.append(f"cancel {response.status} {body['pipeline']['status']} hook ended={ended.exists()}")

        first = threading.Thread(target=cancel)
        first.start()
        deadline = time.monotonic() + 30
        while not started.exists():  # the cancel is inside its hook now
            assert time.monotonic() < deadline and first.is_alive(), answered
            time.sleep(0.05)
        for path in ("/api/overview", f"/api/pipelines/{uuids[0]}", "/api/pipelines?status=finished", "/"):
            with urllib.request.urlopen(base + path, timeout=60) as response:
                answered.append(f"{path} {response.status} hook ended={ended.exists()}")
        release.write_text("go")
        first.join(timeout=60)
    assert answered == [
        "/api/overview 200 hook ended=False",
        f"/api/pipelines/{uuids[0]} 200 hook ended=False",
        "/api/pipelines?status=finished 200 hook ended=False",
        "/ 200 hook ended=False",
        "cancel 200 cancelled hook ended=True",
    ]


def test_workers_page_and_api_show_live_workers_and_stranded_pipelines(shop: tuple[Path, list[str]]) -> None:
    """A real worker's row in ``/api/workers`` and on ``/workers``; a pipeline leased by a worker
    whose heartbeat stopped (a stale row) is shown stranded until its lease expiry (issue #27)."""
    workdir, uuids = shop
    (workdir / "shop.py").write_text((workdir / "shop.py").read_text() + '\n__version__ = "3.1.4"\n')
    store = Orchestrator(f"sqlite:///{workdir / 'shop.db'}").store
    now = datetime.now(timezone.utc)
    ghost = WorkerRow(
        id="ghost:1:deadbeef", host="ghost", pid=1, prorch_version="2.0", app_version=None,
        started_at=now - timedelta(hours=1), heartbeat_at=now - timedelta(minutes=5), beat_seconds=5.0,
        concurrency=4, in_flight=1,
    )  # fmt: skip
    store.upsert_worker(ghost)
    expiry = now + timedelta(minutes=10)
    assert store.claim_one(uuids[3], now, f"{ghost.id}#7", expiry) is not None  # its lease outlives its heartbeat
    with running(workdir, "worker", "--interval", "0.2") as worker, dashboard(workdir) as (base, _):
        rows: list[dict[str, Any]] = []

        def live() -> bool:
            nonlocal rows
            rows = get(base + "/api/workers")[1]["workers"]
            return any(row["pid"] == worker.pid for row in rows)

        wait_for(live, 30, "the worker's row in /api/workers")
        mine = next(row for row in rows if row["pid"] == worker.pid)
        assert mine["alive"] is True and mine["app_version"] == "3.1.4" and mine["free_slots"] == mine["concurrency"]
        dead = next(row for row in rows if row["id"] == ghost.id)
        assert dead["alive"] is False and dead["in_flight"] == 1
        with urllib.request.urlopen(base + "/workers", timeout=10) as response:
            html = response.read().decode()
        assert mine["id"] in html and ghost.id in html and "stale" in html and 'href="/workers"' in html
        status, one = get(base + f"/api/pipelines/{uuids[3]}")
        holder = one["pipeline"]["worker"]
        assert status == 200 and holder["worker"] == ghost.id and holder["stranded"] is True
        assert datetime.fromisoformat(holder["resumes_at"]) == expiry
        with urllib.request.urlopen(base + f"/pipelines/{uuids[3]}", timeout=10) as response:
            assert "stranded, resumes at" in response.read().decode()
        listed = get(base + "/api/pipelines?status=pending")[1]["pipelines"]
        assert [p["worker"]["stranded"] for p in listed if p["uuid"] == uuids[3]] == [True]


def html_of(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_versions_api_and_page_show_what_prorch_versions_prints(shop: tuple[Path, list[str]]) -> None:
    """``/api/versions`` is ``prorch versions --json``; ``/versions`` shows its table, per patch
    the live pipelines with it / predating it, and the lines on code that can go (issue #30)."""
    workdir, uuids = shop
    with dashboard(workdir) as (base, _):
        status, found = get(base + "/api/versions")
        assert status == 200 and found == json.loads(prorch(workdir, "versions", "--json"))
        (order,) = found["versions"]
        assert (order["name"], order["version"], order["live"], order["ended"]) == ("Order", 1, 1, 3)
        assert order["registered"] is True and order["oldest_live"] is not None and order["patches"] == []
        status, html = html_of(base + "/versions")
        assert status == 200 and 'href="/versions"' in html
        row = re.search(r'<tr data-version="Order v1">(.*?)</tr>', html, re.S)
        assert row is not None and '<td class="num live">1</td>' in row.group(1) and ">yes<" in row.group(1)
    code = (workdir / "shop.py").read_text()
    (workdir / "shop.py").write_text(
        code.replace('    name = "Order"\n', '    name = "Order"\n    patches = ["fast-ship"]\n')
    )
    patched = prorch(workdir, "start", "Order", "-p", "item=patched").strip()
    with dashboard(workdir) as (base, _):
        (order,) = get(base + "/api/versions")[1]["versions"]
        (patch,) = order["patches"]
        assert (patch["id"], patch["live_with"], patch["live_without"], patch["declared"]) == (
            "fast-ship",
            1,
            1,
            "patches",
        )
        html = html_of(base + "/versions")[1]
        assert re.search(r'data-patch="fast-ship"><span class="mono">fast-ship</span> 1/1<', html)
        assert 'id="advice"' not in html  # the slowpoke predates the patch: its old branch stays
        prorch(workdir, "cancel", uuids[3])
        html = html_of(base + "/versions")[1]  # counted again at each load
        assert "Order v1: no live pipeline predates patch &#39;fast-ship&#39;; its old branch can go" in html
        prorch(workdir, "cancel", patched)
    (workdir / "prorch.toml").write_text('repository = "sqlite:///shop.db"\n')  # no code loaded here
    with dashboard(workdir) as (base, _):
        (order,) = get(base + "/api/versions")[1]["versions"]
        assert order["live"] == 0 and order["ended"] == 5 and order["registered"] is None
        html = html_of(base + "/versions")[1]
        assert "Order v1: no live pipeline; its code can go (its 5 ended ones are only read)" in html
        assert 'id="code-not-loaded"' in html


def test_pipelines_show_and_filter_by_state(shop: tuple[Path, list[str]]) -> None:
    """The listing shows each pipeline's state (pending splits into running, due and waiting) and
    filters by it through ``query(state=...)``; the overview's cards link to it (issue #29)."""
    workdir, uuids = shop
    prorch(workdir, "start", "Order", "-p", "item=later", "--tenant", "acme")  # not run: due
    with dashboard(workdir, token=TOKEN) as (base, _):
        status, waiting = get(base + "/api/pipelines?state=waiting")
        assert status == 200 and waiting["total"] == 1 and waiting["pipelines"][0]["uuid"] == uuids[3]
        assert waiting["pipelines"][0]["state"] == "waiting" and waiting["filters"] == {"state": "waiting"}
        (due,) = get(base + "/api/pipelines?state=due")[1]["pipelines"]
        assert due["state"] == "due" and due["status"] == "pending"
        assert get(base + "/api/pipelines?state=finished&tenant=acme")[1]["total"] == 0
        assert get(base + "/api/pipelines?state=finished")[1]["total"] == 3
        status, bad = get(base + "/api/pipelines?state=sleeping")
        assert status == 400 and "state 'sleeping': give one of running, due, waiting" in bad["error"]
        assert get(base + f"/api/pipelines/{uuids[3]}")[1]["pipeline"]["state"] == "waiting"
        html = html_of(base + "/pipelines?state=waiting")[1]
        assert '<option value="waiting" selected>' in html and "pending · waiting" in html
        assert uuids[3] in html and due["uuid"] not in html
        assert 'id="state">waiting<' in html_of(base + f"/pipelines/{uuids[3]}")[1]
        bulk = {"action": "cancel", "filters": {"state": "waiting"}, "dry_run": True}
        status, body = post(base + "/api/bulk", bulk, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["matched"] == 1  # a bulk action takes the state filter too
        overview = html_of(base + "/")[1]
        for state in ("running", "due", "waiting"):
            assert f'href="/pipelines?state={state}"' in overview
