"""The dashboard without a browser: login and its cookie, sessions that end with their key, CSRF on
every action, the event stream's limits, escaping, charts from the recent requests and the log tail
(Flask's test client with an in-memory manager), plus freed stream slots against the real proxy.py.
"""

from __future__ import annotations

import json
import re
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from flask import Flask
from flask.testing import FlaskClient
from itsdangerous import URLSafeSerializer

from proxy.app import create_app
from proxy.auth import KeyEntry, Keys, load_keys
from proxy.config import load_config
from proxy.dashboard.charts import model_charts, nice_ceiling
from proxy.dashboard.live import MAX_STREAMS
from proxy.dashboard.sessions import COOKIE, SALT, SESSION_S, Sessions
from proxy.dashboard.tail import TAIL_BYTES, log_path, tail_lines
from proxy.manager import ModelManager
from proxy.observe import RequestRecord
from proxy.routes.admin import status_body
from tests.conftest import ADMIN_KEY, API_KEY, ProxyProcess, fake_profile, wait_until, write_config
from tests.test_manager import FakeLauncher

Start = Callable[..., ProxyProcess]
CSRF = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    config = load_config(write_config(tmp_path, {"m": fake_profile()}))
    manager = ModelManager(config, FakeLauncher())
    yield create_app(config, manager)
    manager.shutdown()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def log_in(client: FlaskClient, key: str = ADMIN_KEY, **headers: str) -> str:
    """Log in and return the page's CSRF token."""
    answer = client.post("/ui/login", headers={"Authorization": f"Bearer {key}", **headers})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    page = client.get("/ui")
    assert page.status_code == 200
    match = CSRF.search(page.get_data(as_text=True))
    assert match is not None
    return match.group(1)


def state(app: Flask, name: str = "m") -> str:
    manager: ModelManager = app.extensions["proxy"].manager
    return next(entry.state for entry in manager.snapshot() if entry.name == name)


def record(**fields: Any) -> RequestRecord:
    values: dict[str, Any] = dict(
        time=time.time(), key="api_key", client="127.0.0.1", route="/v1/chat/completions", dialect="openai",
        model="m", status=200, error=None, waited_s=0.5, ttft_s=0.25, duration_s=2.75, prompt_tokens=12,
        completion_tokens=40, bytes_in=300, bytes_out=4000, stream=True, loaded=False)
    values.update(fields)
    return RequestRecord(**values)


# ----- login and the cookie ---------------------------------------------------------------------

def test_without_a_session_pages_go_to_the_login_and_data_answers_401(client: FlaskClient) -> None:
    page = client.get("/ui")
    assert page.status_code == 303 and page.headers["Location"].endswith("/ui/login")
    for path in ("/ui/events", "/ui/recent", "/ui/logs/m"):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert "log in at /ui/login" in answer.get_json()["error"]["message"]
    login = client.get("/ui/login")
    assert login.status_code == 200 and b'id="login-form"' in login.data


def test_a_wrong_or_missing_key_is_refused_with_a_clear_401_and_no_cookie(client: FlaskClient) -> None:
    wrong = client.post("/ui/login", headers={"Authorization": "Bearer not-a-key-at-all"})
    assert wrong.status_code == 401 and wrong.get_json()["error"]["message"] == "invalid API key"
    assert "Set-Cookie" not in wrong.headers
    missing = client.post("/ui/login")
    assert missing.status_code == 401 and "enter an API key" in missing.get_json()["error"]["message"]
    assert "Set-Cookie" not in missing.headers


def test_the_cookie_names_the_key_never_holds_it_and_is_http_only_strict_with_an_expiry(app: Flask) -> None:
    client = app.test_client()
    answer = client.post("/ui/login", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert answer.get_json() == {"key": "admin_key", "admin": True}
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/ui", f"Max-Age={SESSION_S}", "Expires="):
        assert flag in cookie, (flag, cookie)
    assert "Secure" not in cookie  # plain http: a Secure cookie would never come back
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    assert ADMIN_KEY not in value and API_KEY not in value
    secret = (app.extensions["proxy"].config.proxy.state_dir / "ui_secret").read_bytes().strip()
    payload = URLSafeSerializer(secret, salt=SALT).loads(value)
    assert payload["k"] == "admin_key" and payload["a"] is True
    assert ADMIN_KEY not in json.dumps(payload)


def test_the_cookie_is_secure_when_the_request_came_over_https(client: FlaskClient) -> None:
    answer = client.post("/ui/login", headers={"Authorization": f"Bearer {API_KEY}", "X-Forwarded-Proto": "https"})
    assert "; Secure" in answer.headers["Set-Cookie"]


def test_the_secret_is_private_and_sessions_survive_a_new_app_on_the_same_state_dir(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {"m": fake_profile()}))
    first = ModelManager(config, FakeLauncher())
    client = create_app(config, first).test_client()
    log_in(client)
    first.shutdown()
    secret = config.proxy.state_dir / "ui_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_text().strip()) == 64
    second = ModelManager(config, FakeLauncher())
    again = create_app(config, second).test_client()
    cookie = client.get_cookie(COOKIE, path="/ui")
    assert cookie is not None
    again.set_cookie(COOKIE, cookie.value, path="/ui")
    assert again.get("/ui").status_code == 200  # a restart keeps the secret, so the session holds
    second.shutdown()


def test_a_removed_or_rotated_key_logs_its_sessions_out(app: Flask, client: FlaskClient) -> None:
    context = app.extensions["proxy"]
    context.keys = Keys((*context.keys.entries, KeyEntry("alice", "alice-key-0123456789")))
    log_in(client, "alice-key-0123456789")
    assert client.get("/ui").status_code == 200
    context.keys = Keys((*context.keys.entries[:-1], KeyEntry("alice", "alice-key-rotated-99")))
    assert client.get("/ui").status_code == 303  # same name, new value: the old session is over
    assert client.get("/ui/events").status_code == 401
    log_in(client, "alice-key-rotated-99")
    context.keys = Keys(context.keys.entries[:-1])  # removed from api_tokens.yml
    assert client.get("/ui").status_code == 303


def test_sessions_expire_and_forged_or_tampered_cookies_are_refused(tmp_path: Path) -> None:
    now = [1000.0]
    sessions = Sessions(tmp_path, clock=lambda: now[0])
    value, session = sessions.issue(KeyEntry("bob", "bob-key-0123456789"))
    assert sessions.read(value) == session
    now[0] += SESSION_S - 1
    assert sessions.read(value) == session
    now[0] += 1
    assert sessions.read(value) is None
    now[0] = 1000.0
    tampered = value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]
    assert sessions.read(tampered) is None
    forged = URLSafeSerializer(b"not-the-secret" * 4, salt=SALT).dumps(
        {"k": "bob", "a": True, "f": session.fingerprint, "c": "x", "t": now[0]})
    assert sessions.read(str(forged)) is None
    assert sessions.read(None) is None and sessions.read("") is None and sessions.read("x" * 5000) is None


# ----- actions and CSRF -------------------------------------------------------------------------

def test_actions_need_the_sessions_csrf_token_and_then_load_and_unload(app: Flask, client: FlaskClient) -> None:
    token = log_in(client)
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": ""}):
        for action in ("load", "unload"):
            refused = client.post(f"/ui/{action}?model=m", headers=headers)
            assert refused.status_code == 403, (action, headers)
            assert "CSRF" in refused.get_json()["error"]["message"]
    assert state(app) == "stopped"  # nothing was loaded by a refused click
    loaded = client.post("/ui/load?model=m", headers={"X-CSRF-Token": token})
    assert loaded.status_code == 202 and loaded.get_json()["model"] == "m"
    wait_until(lambda: state(app) == "ready", timeout_s=10, what="the dashboard's load")
    for headers in ({}, {"X-CSRF-Token": token + "x"}):
        assert client.post("/ui/unload?model=m", headers=headers).status_code == 403
    assert state(app) == "ready"
    unloaded = client.post("/ui/unload?model=m", headers={"X-CSRF-Token": token})
    assert unloaded.status_code == 202
    wait_until(lambda: state(app) == "stopped", timeout_s=10, what="the dashboard's unload")
    assert client.post("/ui/load?model=nope", headers={"X-CSRF-Token": token}).status_code == 404
    assert client.post("/ui/load", headers={"X-CSRF-Token": token}).status_code == 400


def test_a_client_key_gets_a_read_only_page_and_cannot_act_even_with_its_token(app: Flask, client: FlaskClient) -> None:
    token = log_in(client, API_KEY)
    page = client.get("/ui").get_data(as_text=True)
    assert "data-action" not in page and "Backend output" not in page and "read-only" in page
    refused = client.post("/ui/unload?model=m", headers={"X-CSRF-Token": token})
    assert refused.status_code == 403 and "admin key" in refused.get_json()["error"]["message"]
    assert client.get("/ui/logs/m").status_code == 403


def test_a_key_in_a_header_may_look_but_not_act(app: Flask, client: FlaskClient) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert client.get("/ui", headers=admin).status_code == 200
    assert client.get("/ui/recent", headers=admin).status_code == 200
    assert client.get("/ui", headers={"Authorization": "Bearer wrong-key-0123"}).status_code == 401
    refused = client.post("/ui/load?model=m", headers=admin)
    assert refused.status_code == 403 and "dashboard session" in refused.get_json()["error"]["message"]
    assert state(app) == "stopped"


def test_logout_needs_the_token_and_ends_the_cookie(client: FlaskClient) -> None:
    token = log_in(client)
    assert client.post("/ui/logout").status_code == 403
    answer = client.post("/ui/logout", headers={"X-CSRF-Token": token})
    assert answer.status_code == 200 and f"{COOKIE}=;" in answer.headers["Set-Cookie"]
    assert client.get("/ui").status_code == 303


def test_with_auth_off_the_dashboard_is_open_and_actions_still_need_its_token(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {"m": fake_profile()}, proxy={"disable_auth": True}))
    manager = ModelManager(config, FakeLauncher())
    app = create_app(config, manager, load_keys(config.proxy.api_tokens_path, disabled=True))
    client = app.test_client()
    assert client.get("/ui/login").status_code == 303
    page = client.get("/ui")
    assert page.status_code == 200 and "auth off" in page.get_data(as_text=True)
    match = CSRF.search(page.get_data(as_text=True))
    assert match is not None and match.group(1)
    assert client.post("/ui/load?model=m").status_code == 403
    assert client.post("/ui/load?model=m", headers={"X-CSRF-Token": match.group(1)}).status_code == 202
    wait_until(lambda: state(app) == "ready", timeout_s=10, what="the load")
    manager.shutdown()


def test_pages_carry_a_strict_csp_and_render_errors_as_pages(client: FlaskClient) -> None:
    for path in ("/ui/login", "/ui"):
        answer = client.get(path)
        csp = answer.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert answer.headers["X-Frame-Options"] == "DENY"
    error = client.get("/ui", headers={"Authorization": "Bearer wrong-key-0123", "Accept": "text/html"})
    assert error.status_code == 401 and error.mimetype == "text/html" and b"invalid API key" in error.data
    for path in ("/ui/static/ui.js", "/ui/static/ui.css"):
        assert client.get(path).status_code == 200, path
    assert client.get("/static/ui.js").status_code == 404  # one place for the files: /ui/static


def test_inline_scripts_are_absent_from_every_template() -> None:
    # The CSP blocks inline script and style: every script is a file, no element has style= or on*=.
    for template in (Path(__file__).parents[1] / "proxy" / "templates" / "ui").glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template
        assert not re.search(r"\sstyle=|\son[a-z]+=", text), template


# ----- what the page shows ---------------------------------------------------------------------

def test_everything_shown_is_escaped(app: Flask, client: FlaskClient) -> None:
    context = app.extensions["proxy"]
    context.recent.request_done(record(route="/v1/<script>x</script>", error="<b>bad</b>", key="<i>k</i>"))
    logs = context.config.proxy.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "m.log").write_text("start <img src=x onerror=alert(1)>\n")
    log_in(client)
    page = client.get("/ui").get_data(as_text=True)
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<b>bad</b>" not in page and "&lt;b&gt;bad&lt;/b&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert client.get("/ui/logs/m").get_json()["lines"] == ["start <img src=x onerror=alert(1)>"]


def test_client_keys_see_their_own_key_name_and_not_the_others(app: Flask, client: FlaskClient) -> None:
    context = app.extensions["proxy"]
    context.recent.request_done(record(key="api_key"))
    context.recent.request_done(record(key="alice"))
    log_in(client, API_KEY)
    fragment = client.get("/ui/recent").get_data(as_text=True)
    assert "<td>api_key</td>" in fragment and "alice" not in fragment and "another key" in fragment


def test_the_recent_fragment_charts_speed_and_ttft_per_model(app: Flask, client: FlaskClient) -> None:
    context = app.extensions["proxy"]
    now = time.time()
    for index in range(3):
        context.recent.request_done(record(time=now - 600 * index, ttft_s=0.1 * (index + 1)))
    context.recent.request_done(record(model="other", completion_tokens=None, ttft_s=None))
    log_in(client)
    fragment = client.get("/ui/recent").get_data(as_text=True)
    assert fragment.count('<figure class="chart-card"') == 2
    model_m = fragment.split('data-model="m"', 1)[1].split("</figure>", 1)[0]
    assert model_m.count('<circle class="point"') == 6 and model_m.count("<polyline") == 2
    other = fragment.split('data-model="other"', 1)[1].split("</figure>", 1)[0]
    assert "<circle" not in other and "no figures yet" in other
    assert fragment.count("<tr class=") == 4


def test_chart_geometry_places_points_in_time_and_scale() -> None:
    now = 10_000.0
    charts = model_charts([record(time=now - 3600, ttft_s=1.0), record(time=now, ttft_s=0.5),
                           record(time=now - 7200, ttft_s=9.0)], now)
    ttft = charts[0].ttft
    assert [(point.x, point.y) for point in ttft.points] == [(ttft.left, ttft.top), (ttft.right, 43.0)]
    assert ttft.top_label == "1" and charts[0].requests == 2  # the older one is outside the hour
    assert [nice_ceiling(value) for value in (0, 0.3, 1, 1.01, 3, 7, 42)] == [1, 0.5, 1, 2, 5, 10, 50]


def test_the_log_tail_reads_only_the_end_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    with path.open("w") as sink:
        for number in range(200_000):  # about 3 MB
            sink.write(f"line {number}\n")
    assert tail_lines(path) == [f"line {number}" for number in range(199_950, 200_000)]
    path.write_bytes(b"a\r\nprogress 10%\rprogress 90%\r\n\x1b[31mred\x1b[0m\n" + b"x" * (TAIL_BYTES * 2))
    assert tail_lines(path)[-1] == "x" * 2000  # one long line, cut; nothing before the window
    path.write_bytes(b"a\r\nprogress 10%\rprogress 90%\r\n\x1b[31mred\x1b[0m\n")
    assert tail_lines(path) == ["a", "progress 90%", "red"]
    assert tail_lines(tmp_path / "missing.log") == []
    assert log_path(tmp_path, "../x") is None and log_path(tmp_path, "m") == tmp_path / "logs" / "m.log"


# ----- the event stream -------------------------------------------------------------------------

def events_of(chunks: Iterator[bytes], count: int) -> list[tuple[str, str]]:
    """Read `count` events (name, data) from an SSE body."""
    found: list[tuple[str, str]] = []
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            fields = dict(line.split(": ", 1) for line in event.decode().splitlines() if ": " in line)
            if "data" in fields:
                found.append((fields.get("event", "message"), fields["data"]))
        if len(found) >= count:
            break
    return found


def test_the_stream_sends_the_status_json_and_a_recent_event_on_new_requests(app: Flask, client: FlaskClient) -> None:
    log_in(client)
    stream = client.get("/ui/events", buffered=False)
    assert stream.status_code == 200 and stream.mimetype == "text/event-stream"
    chunks = iter(stream.response)
    (name, data), = events_of(chunks, 1)
    expected = client.get("/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).get_json()
    sent = json.loads(data)
    assert name == "status" and {**sent, "uptime_s": 0} == {**expected, "uptime_s": 0}
    app.extensions["proxy"].recent.request_done(record())
    names = [name for name, _ in events_of(chunks, 3)]
    assert "recent" in names
    stream.close()


def test_streams_are_limited_and_a_closed_one_frees_its_slot(app: Flask, client: FlaskClient) -> None:
    log_in(client)
    streams = [client.get("/ui/events", buffered=False) for _ in range(MAX_STREAMS)]
    assert all(stream.status_code == 200 for stream in streams)
    refused = client.get("/ui/events", buffered=False)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "10"
    assert "live views" in refused.get_json()["error"]["message"]
    streams.pop().close()  # never read: the slot comes back all the same
    again = client.get("/ui/events", buffered=False)
    assert again.status_code == 200
    for stream in [*streams, again]:
        stream.close()
    assert app.extensions["ui"].streams.open() == 0


def test_a_stream_ends_after_its_lifetime_and_when_its_key_goes(app: Flask, client: FlaskClient) -> None:
    log_in(client)
    ui = app.extensions["ui"]
    ui.stream_s = 0.3
    started = time.monotonic()
    body = b"".join(client.get("/ui/events").response)  # returns: the stream ended by itself
    assert time.monotonic() - started < 10 and body.startswith(b"retry: 2000\n\n")
    assert ui.streams.open() == 0
    ui.stream_s = 60.0
    stream = client.get("/ui/events", buffered=False)
    chunks = iter(stream.response)
    events_of(chunks, 1)
    context = app.extensions["proxy"]
    context.keys = Keys(tuple(entry for entry in context.keys.entries if entry.name != "admin_key"))
    started = time.monotonic()
    list(chunks)  # ends at the next tick: the session's key is gone
    assert time.monotonic() - started < 10
    stream.close()


def test_closed_connections_free_their_stream_slots_promptly(start_proxy: Start) -> None:
    proxy = start_proxy({"m": fake_profile()})
    session = requests.Session()
    session.trust_env = False
    assert session.post(proxy.url + "/ui/login", headers=proxy.headers(admin=True), timeout=30).status_code == 200
    cookie = session.cookies.get(COOKIE)
    request = (f"GET /ui/events HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {COOKIE}={cookie}\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()

    def open_stream() -> tuple[socket.socket, bytes]:
        connection = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        connection.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            piece = connection.recv(4096)
            assert piece, "the proxy closed the connection"
            head += piece
        return connection, head.split(b"\r\n", 1)[0]

    def ended() -> int:  # the access log's line is written once a stream's body closed and freed its slot
        return proxy.log().count("GET /ui/events 200")

    for round_number in range(1, 3):  # the second round gets slots only if the first round's closes freed them
        opened = [open_stream() for _ in range(MAX_STREAMS)]
        assert all(status.endswith(b"200 OK") for _, status in opened), [status for _, status in opened]
        extra, status = open_stream()
        assert b" 503 " in status
        extra.close()
        closed_at = time.monotonic()
        for connection, _ in opened:
            connection.close()  # as a closed browser tab does
        proxy.wait_for(lambda: ended() == MAX_STREAMS * round_number, timeout_s=20, what="the closed streams to end")
        assert time.monotonic() - closed_at < 10  # within a tick or two, not at the stream's end (5 min)


def test_status_serves_what_the_shared_builder_builds(app: Flask, client: FlaskClient) -> None:
    answer = client.get("/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    built = json.loads(json.dumps(status_body(app.extensions["proxy"], admin=True)))
    assert {**answer.get_json(), "uptime_s": 0} == {**built, "uptime_s": 0}
    assert answer.get_data(as_text=True).startswith('{"version":')  # jsonify, compact, in the builder's order


def test_yaml_key_file_names_work_for_login(tmp_path: Path) -> None:
    # A named key from api_tokens.yml logs in under its name.
    config_path = write_config(tmp_path, {"m": fake_profile()})
    tokens = tmp_path / "api_tokens.yml"
    tokens.write_text(yaml.safe_dump({"api_key": API_KEY, "admin_key": ADMIN_KEY,
                                      "keys": [{"name": "carol", "key": "carol-key-0123456789"}]}))
    config = load_config(config_path)
    manager = ModelManager(config, FakeLauncher())
    client = create_app(config, manager).test_client()
    answer = client.post("/ui/login", headers={"x-api-key": "carol-key-0123456789"})
    assert answer.get_json() == {"key": "carol", "admin": False}
    manager.shutdown()
