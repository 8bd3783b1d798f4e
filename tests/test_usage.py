"""GET /usage in-process (Flask's test client, the app create_app builds), and the `usage` and `status`
commands of proxy.py against a request log on disk and a real running proxy.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient

from proxy.app import create_app
from proxy.config import load_config
from proxy.observe import RequestRecord
from proxy.request_log import RequestLog
from proxy.request_stores import SQLiteStore
from proxy.routes import usage
from tests.conftest import ADMIN_KEY, API_KEY, ROOT, ProxyProcess, fake_profile, wait_until, write_config

Start = Callable[..., ProxyProcess]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def record(**fields: Any) -> RequestRecord:
    values: dict[str, Any] = {
        "time": time.time() - 60, "key": "alice", "client": "127.0.0.1", "route": "/v1/chat/completions",
        "dialect": "openai", "model": "fake", "status": 200, "error": None, "waited_s": 0.0, "ttft_s": 0.05,
        "duration_s": 0.5, "prompt_tokens": 10, "completion_tokens": 20, "bytes_in": 100, "bytes_out": 200,
        "stream": False, "loaded": False,
    }
    values.update(fields)
    return RequestRecord(**values)


def filled_log(path: Path) -> RequestLog:
    log = RequestLog(SQLiteStore(path), keep_days=30)
    for duration in (1.0, 2.0, 3.0):
        log.request_done(record(duration_s=duration))
    log.request_done(record(key="bob", model="other", status=502, error="backend_failed", ttft_s=None,
                            prompt_tokens=None, completion_tokens=None))
    assert log.flush(10)
    return log


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = create_app(load_config(write_config(tmp_path, {"fake": fake_profile()})))
    if "usage" not in app.blueprints:  # until create_app registers it
        app.register_blueprint(usage.bp)
    log = filled_log(tmp_path / "requests.sqlite3")
    app.extensions["proxy"].request_log = log
    yield app
    log.close()
    app.extensions["proxy"].manager.shutdown()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_usage_needs_an_admin_key(client: FlaskClient) -> None:
    assert client.get("/usage").status_code == 401
    refused = client.get("/usage", headers={"Authorization": f"Bearer {API_KEY}"})
    assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "forbidden"


def test_usage_by_model_by_default_over_seven_days(client: FlaskClient) -> None:
    answer = client.get("/usage", headers=ADMIN)
    assert answer.status_code == 200
    body = answer.get_json()
    assert (body["since"], body["since_s"], body["by"], body["dropped"]) == ("7d", 7 * 86400, "model", 0)
    fake, other = body["usage"]
    assert fake["model"] == "fake" and fake["requests"] == 3 and fake["errors"] == 0
    assert fake["duration_p50_s"] == 2.0 and fake["duration_p95_s"] == pytest.approx(2.9)
    assert fake["prompt_tokens"] == 30 and fake["completion_tokens"] == 60
    assert other == {**other, "model": "other", "requests": 1, "errors": 1, "ttft_p50_s": None, "prompt_tokens": 0}
    assert set(fake) == {"model", "requests", "errors", "prompt_tokens", "completion_tokens", "duration_p50_s",
                         "duration_p95_s", "ttft_p50_s", "ttft_p95_s", "first", "last"}


def test_usage_by_key_and_day_and_a_short_window(client: FlaskClient) -> None:
    by_key = client.get("/usage?by=key&since=24h", headers=ADMIN).get_json()["usage"]
    assert [(group["key"], group["requests"]) for group in by_key] == [("alice", 3), ("bob", 1)]
    by_day = client.get("/usage?by=day", headers=ADMIN).get_json()["usage"]
    assert sum(group["requests"] for group in by_day) == 4 and re.fullmatch(r"\d{4}-\d\d-\d\d", by_day[-1]["day"])
    assert client.get("/usage?since=30s", headers=ADMIN).get_json()["usage"] == []  # the rows are a minute old


@pytest.mark.parametrize(("query", "param"), [
    ("since=soon", "since"), ("since=0d", "since"), ("since=-7d", "since"), ("by=route", "by"), ("by=", "by"),
])
def test_bad_parameters_are_a_400_naming_the_parameter(client: FlaskClient, query: str, param: str) -> None:
    answer = client.get(f"/usage?{query}", headers=ADMIN)
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    assert error["param"] == param and error["code"] == "invalid_request" and error["message"].startswith(param)
    assert error["type"] == "invalid_request_error"


def test_usage_with_the_request_log_off_is_a_409(app: Flask, client: FlaskClient) -> None:
    app.extensions["proxy"].request_log = None
    answer = client.get("/usage", headers=ADMIN)
    assert answer.status_code == 409
    error = answer.get_json()["error"]
    assert error["code"] == "disabled" and "the request log is off (proxy.request_log)" in error["message"]


def test_an_unreadable_request_log_is_a_503(app: Flask, client: FlaskClient, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database at all" * 100)
    app.extensions["proxy"].request_log = RequestLog(SQLiteStore(garbage), keep_days=30, write=False)
    answer = client.get("/usage", headers=ADMIN)
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    assert answer.get_json()["error"]["code"] == "unavailable"
    assert "garbage.sqlite3" in answer.get_json()["error"]["message"]


# ----- the commands --------------------------------------------------------------------------------

def cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "proxy.py"), "--config", str(config_path), *args],
                          capture_output=True, text=True, timeout=60, cwd=config_path.parent)


def test_usage_command_prints_an_aligned_table_without_a_running_proxy(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, {"fake": fake_profile()})
    filled_log(tmp_path / "run" / "requests.sqlite3").close()
    done = cli(config_path, "usage", "--by", "key")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("request log ") and "the last 7d, by key" in lines[0]
    header, alice, bob = lines[1:]
    assert header.split()[:3] == ["key", "requests", "errors"]
    assert alice.split()[:5] == ["alice", "3", "0", "30", "60"] and bob.split()[:3] == ["bob", "1", "1"]
    assert alice.split()[5:7] == ["2.000", "2.900"]  # p50 and p95 of 1, 2, 3 seconds
    for column in ("requests", "errors", "p95 s"):  # right-aligned under their headers
        end = header.index(column) + len(column)
        assert alice[end - 1] != " " and bob[end - 1] != " " and alice[end:end + 1] in (" ", "")

    assert cli(config_path, "usage", "--since", "10s").stdout.splitlines()[1] == "no requests"
    bad = cli(config_path, "usage", "--since", "soon")
    assert bad.returncode == 2 and "--since: expected a duration like 30m, 24h or 7d" in bad.stderr
    assert cli(config_path, "usage", "--by", "route").returncode == 2  # argparse's choices

    off = write_config(tmp_path / "off", {}, proxy={"request_log": "off"})
    refused = cli(off, "usage")
    assert refused.returncode == 1 and refused.stderr.strip() == "error: the request log is off (proxy.request_log)"


def test_status_command_against_a_running_proxy(start_proxy: Start, tmp_path: Path) -> None:
    proxy = start_proxy({"fake": fake_profile(), "idle": fake_profile()}, proxy={"unload_timer": "10m"})
    assert proxy.chat("fake").status_code == 200

    done = cli(proxy.config_path, "--port", str(proxy.port), "status")
    assert done.returncode == 0, done.stderr
    summary, header, row = done.stdout.splitlines()
    assert f"at http://127.0.0.1:{proxy.port}" in summary and "1 of 2 models loaded" in summary
    assert header.split() == ["model", "state", "pid", "leases", "queued", "expires", "in", "memory"]
    name, state, pid, leases, queued, *rest = row.split()
    assert (name, state, leases, queued) == ("fake", "ready", "0", "0")
    assert int(pid) == proxy.status("fake")["pid"] and re.fullmatch(r"(9|10)m \d\ds", " ".join(rest[:2]))

    stranger = write_config(tmp_path / "stranger", {})
    (stranger.parent / "api_tokens.yml").write_text(yaml.safe_dump({"api_key": "another-api-key-0000",
                                                                    "admin_key": "another-admin-key-000"}))
    refused = cli(stranger, "--port", str(proxy.port), "status")
    assert refused.returncode == 1 and "refused the admin key" in refused.stderr and "401" in refused.stderr
    assert "another-admin-key-000" not in refused.stderr + refused.stdout

    proxy.stop()
    gone = cli(proxy.config_path, "--port", str(proxy.port), "status")
    assert gone.returncode == 1
    assert gone.stderr.strip().startswith(f"error: no proxy is answering at http://127.0.0.1:{proxy.port}/status")
    assert len(gone.stderr.strip().splitlines()) == 1


def test_usage_command_reads_what_a_running_proxy_logged(start_proxy: Start) -> None:
    proxy = start_proxy({"fake": fake_profile()})
    if "request log: " not in proxy.log():  # open_request_log logs where the rows go when the proxy opens it
        pytest.skip("this proxy does not open the request log yet (proxy.py / ProxyContext.request_log)")
    assert proxy.chat("fake").status_code == 200
    assert proxy.chat("nonexistent").status_code == 404
    wait_until(lambda: "fake" in cli(proxy.config_path, "usage").stdout, timeout_s=10,
               what="the request to reach the request log")
    by_key = cli(proxy.config_path, "usage", "--by", "key").stdout.splitlines()
    assert by_key[2].split()[:3] == ["api_key", "2", "1"], by_key
    by_model = {line.split()[0]: line.split()[1:3] for line in cli(proxy.config_path, "usage").stdout.splitlines()[2:]}
    assert by_model["fake"] == ["1", "0"]
    answer = proxy.get("/usage?by=model", admin=True)
    assert answer.status_code == 200 and answer.json()["usage"][0]["requests"] >= 1
