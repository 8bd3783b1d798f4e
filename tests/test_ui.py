"""The dashboard in a real browser: headless Chromium (Debian's, driven by Playwright) against the real
proxy.py in front of tests/fake_backend.py. Logging in, a model turning ready live after a request
made elsewhere, Load and Unload as admin, the read-only view of a client key, refused forged
actions, the cookie's flags and the charts. Without chromium or playwright these tests skip (in CI
they fail). Each test keeps a screenshot, dashboard.png, in its temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ADMIN_KEY, API_KEY, ProxyProcess, fake_profile

Start = Callable[..., ProxyProcess]
CHROMIUM = Path("/usr/bin/chromium")
# The machine has no network: these stop Chromium calling out (updates, sync, first-run pages).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]
WAIT_MS = 30_000  # every browser wait: generous, for a slow, busy 2-core machine
COOKIE = "proxy_ui"


def missing_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed: pip install -r requirements-dev.txt"
    if not CHROMIUM.is_file():
        return (f"Debian's chromium is missing ({CHROMIUM}): apt-get install chromium (.ci/run installs it); "
                "the tests never download a browser")
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = missing_browser()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=120_000)
        try:
            yield launched
        finally:
            launched.close()


class Dashboard:
    """One browser context logged in to one proxy, with the page's script errors collected."""

    def __init__(self, browser: Any, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"script error: {error}"))
        self.page.on("console", lambda message: self.errors.append(message.text)
                     if message.type == "error" and "Content Security Policy" in message.text else None)

    def log_in(self, key: str) -> None:
        self.page.goto(self.proxy.url + "/ui")
        self.page.wait_for_url("**/ui/login")  # no session: the page sends the browser to the login
        self.page.fill("#key", key)
        self.page.click("#login-form button[type=submit]")
        self.page.wait_for_url("**/ui")
        self.expect(self.page.locator("#connection")).to_have_text("live", timeout=WAIT_MS)

    def row(self, model: str, field: str) -> Any:
        return self.page.locator(f'#models tr[data-model="{model}"] [data-field="{field}"]')

    def post(self, path: str, token: str | None) -> int:
        """POST from inside the page (same origin, with its cookie), as a forged script would."""
        headers = {} if token is None else {"X-CSRF-Token": token}
        status: int = self.page.evaluate(
            "([path, headers]) => fetch(path, {method: 'POST', headers}).then(r => r.status)", [path, headers])
        return status

    def cookie(self) -> dict[str, Any]:
        return next(cookie for cookie in self.context.cookies() if cookie["name"] == COOKIE)

    @staticmethod
    def expect(locator: Any) -> Any:
        from playwright.sync_api import expect

        return expect(locator)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_dashboard(browser: Any) -> Iterator[Callable[[ProxyProcess, str], Dashboard]]:
    opened: list[Dashboard] = []

    def open_one(proxy: ProxyProcess, key: str) -> Dashboard:
        dashboard = Dashboard(browser, proxy)
        opened.append(dashboard)
        dashboard.log_in(key)
        return dashboard

    yield open_one
    for dashboard in opened:
        dashboard.close()
    for dashboard in opened:  # the page's own script ran without errors and the CSP blocked none of it
        assert not dashboard.errors, dashboard.errors


def forged(proxy: ProxyProcess, cookie: str, path: str, **kwargs: Any) -> requests.Response:
    """POST with the session's cookie from outside the page, as a cross-site form or script would."""
    return requests.post(proxy.url + path, cookies={COOKIE: cookie}, timeout=30, **kwargs)


def stream_chat(proxy: ProxyProcess) -> None:
    answer = proxy.chat("a", stream=True, stream_options={"include_usage": True})
    assert answer.status_code == 200 and b"[DONE]" in answer.content, answer.text


def test_a_model_turns_ready_live_after_a_request_made_elsewhere_and_the_charts_draw(
        start_proxy: Start, open_dashboard: Callable[[ProxyProcess, str], Dashboard], tmp_path: Path) -> None:
    proxy = start_proxy({"a": fake_profile("--startup-delay", "1", "--token-delay", "0.02")})
    dashboard = open_dashboard(proxy, API_KEY)
    page, expect = dashboard.page, dashboard.expect
    expect(dashboard.row("a", "state")).to_have_text("stopped")
    page.evaluate("window.stillTheSamePage = true")

    sender = threading.Thread(target=stream_chat, args=(proxy,))  # elsewhere: not through the page
    sender.start()
    expect(dashboard.row("a", "state")).to_have_text("ready", timeout=WAIT_MS)
    sender.join(60)
    assert page.evaluate("window.stillTheSamePage === true")  # updated live, never reloaded
    expect(dashboard.row("a", "served")).to_have_text("1", timeout=WAIT_MS)

    idle = dashboard.row("a", "idle")
    expect(idle).to_contain_text("unloads in", timeout=WAIT_MS)
    before = idle.text_content()
    page.wait_for_function("([selector, before]) => document.querySelector(selector).textContent !== before",
                           arg=['#models tr[data-model="a"] [data-field="idle"]', before], timeout=WAIT_MS)

    for _ in range(2):
        stream_chat(proxy)
    points = page.locator('#recent figure[data-model="a"] svg.chart circle.point')
    expect(points.first).to_be_attached(timeout=WAIT_MS)  # the new requests arrived without a reload
    page.wait_for_function("() => document.querySelectorAll('#recent table.requests tbody tr').length >= 3",
                           timeout=WAIT_MS)
    assert points.count() >= 3
    assert page.evaluate("window.stillTheSamePage === true")
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)


def test_an_admin_loads_and_unloads_from_the_page_and_forged_actions_unload_nothing(
        start_proxy: Start, open_dashboard: Callable[[ProxyProcess, str], Dashboard], tmp_path: Path) -> None:
    proxy = start_proxy({"a": fake_profile("--startup-delay", "0.5"), "b": fake_profile()})
    dashboard = open_dashboard(proxy, ADMIN_KEY)
    page, expect = dashboard.page, dashboard.expect
    page.click('#models tr[data-model="a"] button[data-action="load"]')
    expect(page.locator("#message")).to_contain_text("load of a started")
    expect(dashboard.row("a", "state")).to_have_text("ready", timeout=WAIT_MS)
    assert proxy.status("a")["state"] == "ready"

    token = page.get_attribute('meta[name="csrf-token"]', "content")
    assert token
    cookie = dashboard.cookie()["value"]
    assert dashboard.post("/ui/unload?model=a", None) == 403
    assert dashboard.post("/ui/unload?model=a", "not-" + token) == 403
    assert forged(proxy, cookie, "/ui/unload?model=a").status_code == 403
    assert forged(proxy, cookie, "/ui/unload?model=a", headers={"X-CSRF-Token": token[::-1]}).status_code == 403
    # A cross-site form sends a body: refused before it is read (no key in its headers).
    assert forged(proxy, cookie, "/ui/unload", data={"model": "a"}).status_code in (401, 403)
    assert proxy.status("a")["state"] == "ready" and proxy.backends()  # nothing was unloaded

    log = page.locator('#logs details[data-log="a"]')
    log.locator("summary").click()
    expect(log.locator("pre")).to_contain_text("starting:", timeout=WAIT_MS)  # the supervisor's header line
    expect(log.locator("pre")).to_contain_text("fake_backend.py")

    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    page.click('#models tr[data-model="a"] button[data-action="unload"]')
    expect(dashboard.row("a", "state")).to_have_text("stopped", timeout=WAIT_MS)
    proxy.wait_for(lambda: not proxy.backends(), timeout_s=30, what="the backend to exit after Unload")


def test_a_client_key_sees_no_buttons_and_no_logs_and_cannot_unload(
        start_proxy: Start, open_dashboard: Callable[[ProxyProcess, str], Dashboard], tmp_path: Path) -> None:
    proxy = start_proxy({"a": fake_profile()})
    assert proxy.chat("a").status_code == 200
    dashboard = open_dashboard(proxy, API_KEY)
    page, expect = dashboard.page, dashboard.expect
    expect(dashboard.row("a", "state")).to_have_text("ready")
    expect(page.locator(".who")).to_contain_text("read-only")
    assert page.locator("button[data-action]").count() == 0
    assert page.locator("#logs").count() == 0 and "Backend output" not in page.content()

    token = page.get_attribute('meta[name="csrf-token"]', "content") or ""
    cookie = dashboard.cookie()["value"]
    assert dashboard.post("/ui/unload?model=a", None) == 403
    assert dashboard.post("/ui/unload?model=a", "wrong-token") == 403
    assert dashboard.post("/ui/unload?model=a", token) == 403  # its own token: still not an admin
    assert forged(proxy, cookie, "/ui/unload?model=a").status_code == 403
    assert forged(proxy, cookie, "/ui/unload?model=a", headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert page.evaluate("fetch('/ui/logs/a').then(r => r.status)") == 403
    assert proxy.status("a")["state"] == "ready" and proxy.backends()
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)


def test_the_session_cookie_is_http_only_strict_and_expires_and_a_wrong_key_is_told(
        start_proxy: Start, browser: Any, open_dashboard: Callable[[ProxyProcess, str], Dashboard]) -> None:
    proxy = start_proxy({"a": fake_profile()})
    stranger = Dashboard(browser, proxy)
    try:
        stranger.page.goto(proxy.url + "/ui/login")
        stranger.page.fill("#key", "not-a-valid-key-000")
        stranger.page.click("#login-form button[type=submit]")
        stranger.expect(stranger.page.locator("#login-error")).to_have_text("invalid API key")
        assert stranger.page.url.endswith("/ui/login") and not stranger.context.cookies()
    finally:
        stranger.close()

    dashboard = open_dashboard(proxy, ADMIN_KEY)
    cookie = dashboard.cookie()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert cookie["secure"] is False  # plain http here; https (or X-Forwarded-Proto: https) makes it Secure
    assert abs(cookie["expires"] - (time.time() + 12 * 3600)) < 600
    assert ADMIN_KEY not in cookie["value"] and API_KEY not in cookie["value"]
    assert COOKIE not in dashboard.page.evaluate("document.cookie")  # HttpOnly: scripts cannot read it

    dashboard.page.click("#logout")
    dashboard.page.wait_for_url("**/ui/login")
    assert not [c for c in dashboard.context.cookies() if c["name"] == COOKIE]
    dashboard.page.goto(proxy.url + "/ui")
    dashboard.page.wait_for_url("**/ui/login")
