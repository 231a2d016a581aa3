"""The dashboard as an operator's tool (issue #29 items 1, 2 and 7), against a real `prorch
dashboard` process over a real SQLite store: rerun from a step and bulk actions through the JSON
API and the pages' forms (each with its confirm step), search by uuid or key, the timeline and
the earlier attempts' errors, and who acted and why in the history. Bad input is one clear
error with nothing stored; logged-out or forged requests are refused with nothing changed."""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from prorch import Orchestrator
from tests.acceptance.test_dashboard_guards import FORM, call, form
from tests.support.dashboard import dashboard, prorch, shop_workdir

TOKEN = "ops-s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
API_ACTOR = "dashboard API (127.0.0.1)"


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Path, list[str], str]:
    """Three orders whose card was declined (failed at Charge, keys order-0..2), and one waiting."""
    workdir = shop_workdir(tmp_path)
    decline = tmp_path / "decline"
    decline.touch()
    failed = [prorch(workdir, "start", "Order", "-p", f"item=i{n}", "--key", f"order-{n}").strip() for n in range(3)]
    prorch(workdir, "run", SHOP_DECLINE_FILE=str(decline))
    waiting = prorch(workdir, "start", "Order", "-p", "item=slowpoke").strip()
    prorch(workdir, "run")
    return workdir, failed, waiting


def store(workdir: Path) -> Orchestrator:
    return Orchestrator(f"sqlite:///{workdir / 'shop.db'}")


def snapshot(workdir: Path) -> list[tuple[str, str, int]]:
    """Every pipeline's uuid, status and number of history events: what 'nothing changed' means."""
    orchestrator = store(workdir)
    return sorted((p.uuid, p.status.value, len(orchestrator.history(p.uuid))) for p in orchestrator.list_pipelines())


def api(base: str, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    answer = call(base, "POST", path, body if isinstance(body, str) else json.dumps(body), headers or BEARER)
    return answer.status, answer.json()


def login(base: str) -> tuple[dict[str, str], str]:
    """A session cookie (as form headers) and a CSRF token of that session."""
    answer = call(base, "POST", "/login", form({"token": TOKEN}), FORM)
    session = re.search(r"prorch_session=([^;]+)", answer.headers["Set-Cookie"])
    assert session is not None
    cookie = {"Cookie": f"prorch_session={session.group(1)}"}
    listing = call(base, "GET", "/pipelines?name=Order", headers=cookie).text
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', listing)
    assert csrf is not None
    return {**cookie, **FORM}, csrf.group(1)


def test_rerun_through_the_api_links_both_pipelines_and_records_who(shop: tuple[Path, list[str], str]) -> None:
    workdir, failed, waiting = shop
    with dashboard(workdir, token=TOKEN) as (base, _):
        before = snapshot(workdir)
        for body, code, says in [
            ({}, 400, "a rerun needs from_step"),
            ({"from_step": "Nope"}, 400, "rerun from one of: Reserve, Charge, Ship"),
            ({"from_step": "Ship"}, 409, "step Charge of pipeline"),
            ({"from_step": "Charge", "params": [1]}, 400, "params must be a JSON object"),
            ({"from_step": "Charge", "params": {"qty": "many"}}, 400, "qty"),
            ({"from_step": "Charge", "cancel_original": "maybe"}, 400, "cancel_original must be true or false"),
            ({"from_step": "Charge", "reason": 5}, 400, "reason must be a text"),
            ("[not json", 400, "the body is not JSON"),
        ]:
            status, answer = api(base, f"/api/pipelines/{failed[0]}/rerun", body)
            assert (status, says in answer["error"]) == (code, True), (body, answer)
        status, answer = api(base, f"/api/pipelines/{waiting}/rerun", {"from_step": "Ship"})
        assert status == 409 and "cancel_original" in answer["error"]
        status, answer = api(base, "/api/pipelines/00000000-0000-0000-0000-000000000000/rerun", {"from_step": "Ship"})
        assert status == 404
        assert snapshot(workdir) == before  # nothing stored, nothing cancelled

        body = {"from_step": "Charge", "params": {"qty": 5}, "reason": "card fixed"}
        status, answer = api(base, f"/api/pipelines/{failed[0]}/rerun", body)
        assert status == 200 and answer["original_uuid"] == failed[0], answer
        new = answer["pipeline"]["uuid"]
        assert answer["pipeline"]["params"]["qty"] == 5 and answer["forked_from"] == {
            "uuid": failed[0],
            "step": "Charge",
        }
        original = call(base, "GET", f"/api/pipelines/{failed[0]}").json()
        [rerun] = original["reruns"]  # type: ignore[misc]
        assert rerun["uuid"] == new and rerun["actor"] == API_ACTOR and rerun["reason"] == "card fixed"
        assert f'href="/pipelines/{new}"' in call(base, "GET", f"/pipelines/{failed[0]}").text
        assert f'id="forked-from">{failed[0]}<' in call(base, "GET", f"/pipelines/{new}").text

        # a live original: cancelled first when asked, with the same actor and reason
        status, answer = api(base, f"/api/pipelines/{waiting}/rerun", {"from_step": "Ship", "cancel_original": True})
        assert status == 200
        history = call(base, "GET", f"/api/pipelines/{waiting}").json()["history"]
        cancelled = [e for e in history if e["type"] == "pipeline.cancelled"]  # type: ignore[union-attr,index]
        assert [e["data"]["actor"] for e in cancelled] == [API_ACTOR]  # type: ignore[index]


def test_retry_through_the_api_keeps_the_error_it_clears(shop: tuple[Path, list[str], str]) -> None:
    workdir, failed, _ = shop
    with dashboard(workdir, token=TOKEN) as (base, _):
        status, answer = api(base, f"/api/pipelines/{failed[1]}/retry", {"reason": "bank said ok"})
        assert status == 200 and answer["pipeline"]["status"] == "pending"
        retried = answer["history"][-1]
        assert retried["type"] == "pipeline.retried"
        assert retried["data"]["actor"] == API_ACTOR and retried["data"]["reason"] == "bank said ok"
        assert retried["data"]["errors"][0]["message"] == "card declined"
        assert answer["earlier_attempts"]["Charge"][0]["message"] == "card declined"
        page = call(base, "GET", f"/pipelines/{failed[1]}").text
        assert "earlier attempts (1)" in page and "retried by dashboard API (127.0.0.1): bank said ok" in page


def test_bulk_through_the_api_dry_run_then_act(shop: tuple[Path, list[str], str]) -> None:
    workdir, failed, waiting = shop
    with dashboard(workdir, token=TOKEN) as (base, _):
        before = snapshot(workdir)
        for body, says in [
            ({"action": "retry"}, "give at least one filter"),
            ({"action": "retry", "filters": {"status": "bogus"}}, "status 'bogus'"),
            ({"action": "retry", "filters": {"colour": "red"}}, "unknown filter colour"),
            ({"action": "retry", "filters": ["status"]}, "filters must be a JSON object"),
            ({"action": "explode", "filters": {"status": "failed"}}, "bulk action 'explode'"),
            ({"action": "rerun", "filters": {"status": "failed"}}, "a rerun needs from_step"),
            ({"action": "purge", "filters": {"status": "failed"}, "older_than": "soon"}, "give an age such as 30d"),
            ({"action": "retry", "filters": {"status": "failed"}, "dry_run": "perhaps"}, "dry_run must be true"),
            ({"action": "retry", "filters": {"status": "failed"}, "reason": "x" * 1001}, "at most 1000"),
            ("[1]", "send a JSON object"),
        ]:
            status, answer = api(base, "/api/bulk", body)
            assert status == 400 and says in answer["error"], (body, answer)
        assert snapshot(workdir) == before

        status, dry = api(base, "/api/bulk", {"action": "retry", "filters": {"status": "failed"}, "dry_run": True})
        assert status == 200 and (dry["matched"], dry["done"], dry["dry_run"]) == (3, 3, True)
        status, dry = api(base, "/api/bulk", {"action": "cancel", "filters": {"name": "Order"}, "dry_run": True})
        assert (dry["matched"], dry["done"], dry["skipped_why"]) == (4, 1, {"already failed": 3})
        assert snapshot(workdir) == before  # a dry run changes nothing

        body = {"action": "retry", "filters": {"status": "failed", "name": "Order"}, "reason": "bank is back"}
        status, done = api(base, "/api/bulk", body)
        assert status == 200 and (done["matched"], done["done"], done["failed"]) == (3, 3, 0)
        orchestrator = store(workdir)
        for uuid in failed:
            assert orchestrator.get(uuid).pipeline.status.value == "pending"
            [event] = [e for e in orchestrator.history(uuid) if e.type.value == "pipeline.retried"]
            assert event.data["actor"] == API_ACTOR and event.data["reason"] == "bank is back"
        assert orchestrator.get(waiting).pipeline.status.value == "pending"


def test_search_by_uuid_or_key(shop: tuple[Path, list[str], str]) -> None:
    workdir, failed, _ = shop
    with dashboard(workdir) as (base, _):  # read-only: searching is reading
        for text in (failed[2], failed[2].upper(), f"  {failed[2]} ", "order-2"):
            found = call(base, "GET", f"/search?q={urllib.parse.quote(text)}")
            assert found.status == 303 and found.headers["Location"] == f"/pipelines/{failed[2]}", text
            assert call(base, "GET", f"/api/search?q={urllib.parse.quote(text)}").json() == {"uuid": failed[2]}
        missing = call(base, "GET", "/search?q=order-9")
        assert missing.status == 404 and "no pipeline has the uuid or key &#39;order-9&#39;" in missing.text
        assert call(base, "GET", "/api/search?q=00000000-0000-0000-0000-000000000000").status == 404
        assert call(base, "GET", "/api/search?q=").status == 400
        for page in ("/", "/pipelines", f"/pipelines/{failed[0]}", "/workers"):  # the box is on every page
            assert 'id="search"' in call(base, "GET", page).text


def test_the_pages_confirm_before_acting_and_record_the_dashboard_actor(shop: tuple[Path, list[str], str]) -> None:
    workdir, failed, waiting = shop
    with dashboard(workdir, token=TOKEN) as (base, _):
        headers, csrf = login(base)
        before = snapshot(workdir)
        for action, fields in [
            ("cancel", {}),
            ("retry", {}),
            ("rerun", {"from_step": "Charge", "params": '{"qty": 3}'}),
        ]:
            target = waiting if action == "cancel" else failed[0]
            asked = call(base, "POST", f"/pipelines/{target}/{action}", form({"csrf": csrf, **fields}), headers)
            assert asked.status == 200 and f"Yes, {action}" in asked.text, (action, asked.text)
        assert snapshot(workdir) == before  # asking is not doing
        bad = call(base, "POST", f"/pipelines/{failed[0]}/rerun", form({"csrf": csrf, "from_step": "Nope"}), headers)
        assert bad.status == 400 and "rerun from one of" in bad.text
        bad = call(base, "POST", f"/pipelines/{failed[0]}/rerun",
                   form({"csrf": csrf, "from_step": "Charge", "params": "{oops"}), headers)  # fmt: skip
        assert bad.status == 400 and "params is not valid JSON" in bad.text
        assert snapshot(workdir) == before

        done = call(base, "POST", f"/pipelines/{waiting}/cancel",
                    form({"csrf": csrf, "confirm": "yes", "reason": "duplicate order"}), headers)  # fmt: skip
        assert done.status == 303
        [event] = [e for e in store(workdir).history(waiting) if e.type.value == "pipeline.cancelled"]
        assert event.data == {"actor": "dashboard (127.0.0.1)", "reason": "duplicate order"}

        fields = {"csrf": csrf, "confirm": "yes", "from_step": "Charge", "params": '{"qty": 3}'}
        done = call(base, "POST", f"/pipelines/{failed[0]}/rerun", form(fields), headers)
        assert done.status == 303 and done.headers["Location"].startswith("/pipelines/")
        new = done.headers["Location"].split("?")[0].rsplit("/", 1)[1]
        assert new != failed[0] and store(workdir).get(new).pipeline.params["qty"] == 3

        # bulk: the review is a dry run with the count; the confirmation acts
        fields = {"csrf": csrf, "status": "failed", "action": "retry"}
        review = call(base, "POST", "/bulk", form(fields), headers)
        assert review.status == 200 and "Yes, retry 3 pipelines" in review.text and 'id="matched">3<' in review.text
        assert [s[:2] for s in snapshot(workdir) if s[1] == "failed"] == [s[:2] for s in before if s[1] == "failed"]
        done = call(base, "POST", "/bulk", form({**fields, "confirm": "yes", "reason": "fixed"}), headers)
        assert done.status == 200 and "Done: retry" in done.text and 'id="done-count">3<' in done.text
        assert all(store(workdir).get(uuid).pipeline.status.value == "pending" for uuid in failed)


def test_logged_out_or_forged_requests_are_refused_and_nothing_changes(shop: tuple[Path, list[str], str]) -> None:
    workdir, failed, waiting = shop
    with dashboard(workdir, token=TOKEN) as (base, _):
        before = snapshot(workdir)
        page = call(base, "GET", f"/pipelines/{failed[0]}").text
        for button in ("retry", "rerun"):
            assert re.search(rf'<button id="{button}" disabled title="log in to act">', page), button
        assert re.search(
            r'<button id="cancel" disabled title="log in to act">', call(base, "GET", f"/pipelines/{waiting}").text
        )
        assert 'id="bulk-review" disabled title="log in to act"' in call(base, "GET", "/pipelines?status=failed").text
        headers, csrf = login(base)
        rerun = {"from_step": "Charge", "confirm": "yes"}
        bulk = {"status": "failed", "action": "retry", "confirm": "yes"}
        for path, fields in [(f"/pipelines/{failed[0]}/rerun", rerun), ("/bulk", bulk)]:
            for sent_headers, token in [(FORM, csrf), (headers, "forged"), (headers, "")]:
                refused = call(base, "POST", path, form({**fields, "csrf": token}), sent_headers)
                assert refused.status == 403 and "log in with the dashboard token" in refused.text, (path, token)
        for path, body in [(f"/api/pipelines/{failed[0]}/rerun", {"from_step": "Charge"}),
                           ("/api/bulk", {"action": "retry", "filters": {"status": "failed"}})]:  # fmt: skip
            for sent in ({"Content-Type": "application/json"}, {**BEARER, "Authorization": "Bearer wrong"}):
                status, answer = api(base, path, body, sent)
                assert status == 403 and "Bearer" in answer["error"], (path, answer)
        assert snapshot(workdir) == before
    with dashboard(workdir) as (base, _):  # read-only: no token is set
        status, answer = api(base, "/api/bulk", {"action": "retry", "filters": {"status": "failed"}})
        assert status == 403 and "read-only" in answer["error"]
        refused = call(base, "POST", "/bulk", form(bulk), FORM)
        assert refused.status == 403 and "PRORCH_DASHBOARD_TOKEN" in refused.text
        assert 'id="retry" disabled title="read-only' in call(base, "GET", f"/pipelines/{failed[0]}").text
        assert snapshot(workdir) == before


def test_pause_and_resume_from_the_pages_and_the_api_show_everywhere(shop: tuple[Path, list[str], str]) -> None:
    """Pause asks to confirm like cancel; the pipeline then reads as paused (with which pause) on
    its page, in the listing, in the API and on the overview; resume through the API ends it."""
    workdir, _, waiting = shop
    with dashboard(workdir, token=TOKEN) as (base, _):
        headers, csrf = login(base)
        page = call(base, "GET", f"/pipelines/{waiting}", headers=headers).text
        assert 'id="pause"' in page and 'id="resume"' not in page
        asked = call(base, "POST", f"/pipelines/{waiting}/pause", form({"csrf": csrf}), headers)
        assert asked.status == 200 and "Yes, pause" in asked.text and store(workdir).pauses() == []
        done = call(base, "POST", f"/pipelines/{waiting}/pause",
                    form({"csrf": csrf, "confirm": "yes", "reason": "check the stock"}), headers)  # fmt: skip
        assert done.status == 303
        [pause] = store(workdir).pauses()
        assert (pause.kind, pause.value, pause.actor, pause.reason) == ("pipeline", waiting, "dashboard (127.0.0.1)",
                                                                         "check the stock")  # fmt: skip

        shown = call(base, "GET", f"/api/pipelines/{waiting}", headers=BEARER).json()
        assert shown["pipeline"]["state"] == "paused" and shown["paused_itself"] is True
        assert shown["pause"]["text"] == "paused (pipeline " + waiting + ", by dashboard (127.0.0.1): check the stock)"
        listed = call(base, "GET", "/api/pipelines?state=paused", headers=BEARER).json()
        assert [p["uuid"] for p in listed["pipelines"]] == [waiting] and listed["pipelines"][0]["held"]
        assert call(base, "GET", "/api/overview", headers=BEARER).json()["paused"] == 1
        page = call(base, "GET", f"/pipelines/{waiting}", headers=headers).text
        assert 'id="resume"' in page and 'id="paused"' in page

        status, answer = api(base, f"/api/pipelines/{waiting}/resume", {"reason": "stock is fine"})
        assert status == 200 and answer["done"] == f"resumed pipeline {waiting}" and answer["pause"] is None
        assert store(workdir).pauses() == []
        status, answer = api(base, f"/api/pipelines/{waiting}/resume", {})
        assert status == 409 and "is not paused" in answer["error"], answer
        # a class: paused from one of its pipelines' pages, resumed from it (the pause that holds it)
        status, answer = api(base, f"/api/pipelines/{waiting}/pause-class", {"reason": "supplier down"})
        assert status == 200 and answer["done"] == "paused class Order" and answer["pause"]["kind"] == "class"
        assert [p.label() for p in store(workdir).pauses()] == ["class Order"]
        other = call(base, "GET", f"/pipelines/{waiting}", headers=headers).text
        assert "Resume class Order…" in other and 'id="pause-class"' not in other
        done = call(base, "POST", f"/pipelines/{waiting}/resume", form({"csrf": csrf, "confirm": "yes"}), headers)
        assert done.status == 303 and "resumed+class+Order" in done.headers["Location"]
        assert store(workdir).pauses() == []
    kinds = [e.type.value for e in store(workdir).history(waiting)]
    assert kinds[-2:] == ["pipeline.paused", "pipeline.resumed"]


@pytest.mark.slow
def test_a_tenant_is_paused_from_its_pipelines_page_after_a_confirm_and_resumed(tmp_path: Path) -> None:
    """The pipeline page of a tenant's pipeline pauses the tenant (asking first, as the other
    pauses do); the pause holds it, and resume ends the tenant's pause. A pipeline without a
    tenant has no such button, and the API refuses it with one clear error."""
    workdir = shop_workdir(tmp_path)
    waiting = prorch(workdir, "start", "Order", "-p", "item=slowpoke", "--tenant", "acme").strip()
    lone = prorch(workdir, "start", "Order", "-p", "item=slowpoke").strip()
    with dashboard(workdir, token=TOKEN) as (base, _):
        headers, csrf = login(base)
        page = call(base, "GET", f"/pipelines/{waiting}", headers=headers).text
        assert 'id="pause-tenant"' in page and "Pause tenant acme…" in page
        assert 'id="pause-tenant"' not in call(base, "GET", f"/pipelines/{lone}", headers=headers).text
        asked = call(base, "POST", f"/pipelines/{waiting}/pause-tenant", form({"csrf": csrf}), headers)
        assert asked.status == 200 and "Yes, pause-tenant" in asked.text and store(workdir).pauses() == []
        assert "Pause the tenant <strong>acme</strong>" in asked.text
        done = call(base, "POST", f"/pipelines/{waiting}/pause-tenant",
                    form({"csrf": csrf, "confirm": "yes", "reason": "acme migrates"}), headers)  # fmt: skip
        assert done.status == 303 and "paused+tenant+acme" in done.headers["Location"]
        [pause] = store(workdir).pauses()
        assert (pause.kind, pause.value, pause.actor, pause.reason) == ("tenant", "acme", "dashboard (127.0.0.1)",
                                                                         "acme migrates")  # fmt: skip
        assert store(workdir).query(state="paused").pipelines[0].uuid == waiting
        page = call(base, "GET", f"/pipelines/{waiting}", headers=headers).text
        assert "Resume tenant acme…" in page and 'id="pause-tenant"' not in page
        status, answer = api(base, f"/api/pipelines/{lone}/pause-tenant", {})
        assert status == 409 and "has no tenant" in answer["error"], answer
        done = call(base, "POST", f"/pipelines/{waiting}/resume", form({"csrf": csrf, "confirm": "yes"}), headers)
        assert done.status == 303 and "resumed+tenant+acme" in done.headers["Location"]
        assert store(workdir).pauses() == []
