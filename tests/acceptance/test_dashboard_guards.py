"""The dashboard's guards against what an operator found (#25), against a real `prorch
dashboard` process over a real SQLite store: token guessing is refused per client, a session
ends on the server at logout, a foreign ``Host`` (DNS rebinding) is refused, bad filters and
bodies are a 400 with a message, and a dashboard without the app's classes calls nothing blocked."""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse
from pathlib import Path

import pytest

from tests.support.dashboard import dashboard, prorch, shop_workdir

TOKEN = "dash-s3cret-token"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.text = response.read().decode()

    def json(self) -> dict[str, object]:
        loaded = json.loads(self.text)
        assert isinstance(loaded, dict)
        return loaded


def call(
    base: str,
    method: str,
    path: str,
    body: bytes | str = b"",
    headers: dict[str, str] | None = None,
    source: str | None = None,
) -> Answer:
    """One request as sent, byte for byte: a chosen Host, cookie or client address."""
    url = urllib.parse.urlsplit(base)
    assert url.hostname is not None
    connection = http.client.HTTPConnection(
        url.hostname, url.port, timeout=30, source_address=(source, 0) if source else None
    )
    try:
        data = body.encode() if isinstance(body, str) else body
        connection.request(method, path, body=data or None, headers=headers or {})
        return Answer(connection.getresponse())
    finally:
        connection.close()


def form(fields: dict[str, str]) -> str:
    return urllib.parse.urlencode(fields)


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Path, str]:
    workdir = shop_workdir(tmp_path)
    uuid = prorch(workdir, "start", "Order", "-p", "item=slowpoke").strip()
    prorch(workdir, "run")
    return workdir, uuid


def test_token_guessing_is_refused_per_client_after_a_few_failures(shop: tuple[Path, str]) -> None:
    workdir, uuid = shop
    with dashboard(workdir, token=TOKEN) as (base, _):
        for _ in range(5):
            assert call(base, "POST", "/login", form({"token": "guess"}), FORM).status == 403
        refused = call(base, "POST", "/login", form({"token": TOKEN}), FORM)  # even the right one, now
        assert refused.status == 429 and int(refused.headers["Retry-After"]) > 0
        assert "too many wrong tokens" in refused.text
        # the API's bearer token is the same secret: guessing it there is refused as well
        api = call(base, "POST", f"/api/pipelines/{uuid}/cancel", headers={"Authorization": f"Bearer {TOKEN}"})
        assert api.status == 429 and "too many wrong tokens" in api.json()["error"]
        assert int(api.headers["Retry-After"]) > 0
        # another client (another loopback address) is not held back by the first one's guesses
        other = call(base, "POST", "/login", form({"token": TOKEN}), FORM, source="127.0.0.2")
        assert other.status == 303 and "prorch_session=" in other.headers["Set-Cookie"]


def test_a_session_captured_before_logout_is_refused_after_it(shop: tuple[Path, str]) -> None:
    workdir, uuid = shop
    with dashboard(workdir, token=TOKEN) as (base, _):
        login = call(base, "POST", "/login", form({"token": TOKEN}), FORM)
        assert login.status == 303
        match = re.search(r"prorch_session=([^;]+)", login.headers["Set-Cookie"])
        assert match is not None
        cookie = {"Cookie": f"prorch_session={match.group(1)}"}
        page = call(base, "GET", f"/pipelines/{uuid}", headers=cookie)
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert csrf is not None and "log out" in page.text
        assert call(base, "POST", "/logout", headers=cookie).status == 303
        # the stolen cookie and its CSRF token, replayed after the logout
        replay = call(base, "POST", f"/pipelines/{uuid}/cancel", form({"csrf": csrf.group(1)}), {**cookie, **FORM})
        assert replay.status == 403 and "log in with the dashboard token" in replay.text
        assert "log out" not in call(base, "GET", "/", headers=cookie).text
        assert call(base, "GET", f"/api/pipelines/{uuid}").json()["pipeline"]["status"] == "pending"  # type: ignore[index]


def test_a_foreign_host_header_is_refused(shop: tuple[Path, str]) -> None:
    workdir, _ = shop
    with dashboard(workdir, "--allowed-host", "dash.example", PRORCH_DASHBOARD_ALLOWED_HOSTS="ops.example") as (
        base,
        _,
    ):
        port = urllib.parse.urlsplit(base).port
        rebound = call(base, "GET", "/api/overview", headers={"Host": f"evil.example:{port}"})
        assert rebound.status == 400 and "evil.example" in rebound.text and "--allowed-host" in rebound.text
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "dash.example", "LOCALHOST"):
            assert call(base, "GET", "/api/overview", headers={"Host": host}).status == 200, host
        # the flag wins over the environment, as with every setting
        assert call(base, "GET", "/", headers={"Host": "ops.example"}).status == 400
    with dashboard(workdir, PRORCH_DASHBOARD_ALLOWED_HOSTS="ops.example, *.corp.example") as (base, _):
        for host in ("ops.example", "dash.corp.example:8181"):
            assert call(base, "GET", "/", headers={"Host": host}).status == 200, host
        assert call(base, "GET", "/", headers={"Host": "corp.example.evil"}).status == 400


def test_bad_filters_and_bodies_are_a_400_with_a_message(shop: tuple[Path, str]) -> None:
    workdir, uuid = shop
    bearer = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with dashboard(workdir, token=TOKEN) as (base, _):
        for query, says in [
            ("status=bogus", "status 'bogus'"),
            ("since=99999999999d", "since '99999999999d'"),
            ("until=99999999999w", "until '99999999999w'"),
            ("version=99999999999999999999999", "version"),
        ]:
            api = call(base, "GET", f"/api/pipelines?{query}")
            assert api.status == 400 and says in str(api.json()["error"]), (query, api.text)
            page = call(base, "GET", f"/pipelines?{query}")
            assert page.status == 400 and says.replace("'", "&#39;") in page.text, (query, page.text)
        for body in ("{not json", "[1, 2]", '"go"'):
            sent = call(base, "POST", f"/api/pipelines/{uuid}/send", body, bearer)
            assert sent.status == 400 and "JSON object" in str(sent.json()["error"]), (body, sent.text)
        # non-ASCII where a session cookie or a CSRF token belongs
        latin = "prorch_session=caf\xe9.\xe9t\xe9".encode("latin-1")
        raw = {"Cookie": latin.decode("latin-1"), **FORM}
        assert call(base, "GET", "/", headers={"Cookie": raw["Cookie"]}).status == 200  # a page: logged out
        refused = call(base, "POST", f"/pipelines/{uuid}/cancel", form({"csrf": "x"}), raw)
        assert refused.status == 400 and "session cookie" in refused.text
        login = call(base, "POST", "/login", form({"token": TOKEN}), FORM)
        session = re.search(r"prorch_session=([^;]+)", login.headers["Set-Cookie"])
        assert session is not None
        cookie = {"Cookie": f"prorch_session={session.group(1)}", **FORM}
        refused = call(base, "POST", f"/pipelines/{uuid}/cancel", form({"csrf": "caf\xe9"}), cookie)
        assert refused.status == 400 and "CSRF token" in refused.text
        assert call(base, "GET", f"/api/pipelines/{uuid}").json()["pipeline"]["status"] == "pending"  # type: ignore[index]


def test_without_the_app_nothing_is_called_blocked(tmp_path: Path) -> None:
    workdir = shop_workdir(tmp_path)
    (workdir / "prorch.toml").write_text('repository = "sqlite:///shop.db"\n')  # no app: --app on each command
    done = prorch(workdir, "--app", "shop", "start", "Order", "-p", "item=i1").strip()
    prorch(workdir, "--app", "shop", "run")
    waiting = prorch(workdir, "--app", "shop", "start", "Order", "-p", "item=i2").strip()
    with dashboard(workdir) as (base, _):
        overview = call(base, "GET", "/api/overview").json()
        assert overview["blocked"] is None and overview["due"] == 1
        one = call(base, "GET", f"/api/pipelines/{waiting}").json()
        assert one["blocked"] is None and one["code_loaded"] is False
        stored_next_run = one["pipeline"]["next_run_at"]  # type: ignore[index]
        assert stored_next_run and one["next_run"] == {"at": stored_next_run, "reason": "due now"}
        page = call(base, "GET", f"/pipelines/{waiting}").text
        next_run = re.search(r'<dd id="next-run">(.*?)</dd>', page)
        assert next_run is not None and "blocked" not in next_run.group(1) and "due now" in next_run.group(1)
        assert "Blocked:" not in page
        assert "Code not loaded in this dashboard" in page
        assert "Blocked:" not in call(base, "GET", f"/pipelines/{done}").text
    (workdir / "prorch.toml").write_text('repository = "sqlite:///shop.db"\napp = ["shop"]\n')
    with dashboard(workdir) as (base, _):  # with the app, the same counts as before
        assert call(base, "GET", "/api/overview").json()["blocked"] == 0
        assert call(base, "GET", f"/api/pipelines/{waiting}").json()["code_loaded"] is True
