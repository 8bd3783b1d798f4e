"""Live reload through the real proxy.py: SIGHUP or an edited file applies a new config without
dropping loaded models whose profile did not change; an invalid config keeps the running one.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import yaml

from tests.conftest import ProxyProcess, fake_profile

Start = Callable[..., ProxyProcess]


def test_sighup_applies_changed_profiles_and_keeps_unchanged_models(start_proxy: Start) -> None:
    proxy = start_proxy({"steady": fake_profile(), "tuned": fake_profile(template={"temperature": 0.1})},
                        proxy={"max_loaded_models": 2})
    assert proxy.chat("steady").status_code == 200
    assert proxy.chat("tuned", temperature=None).json()["echo"]["temperature"] == 0.1
    steady_pid = proxy.status("steady")["pid"]
    tuned_pid = proxy.status("tuned")["pid"]

    profiles = proxy.config_path.parent / "model_configs"
    (profiles / "tuned.yml").write_text(yaml.safe_dump(fake_profile(template={"temperature": 0.7})))
    (profiles / "added.yml").write_text(yaml.safe_dump(fake_profile()))
    proxy.popen.send_signal(signal.SIGHUP)
    proxy.wait_for(lambda: "config reloaded" in proxy.log(), timeout_s=5, what="reload")

    proxy.wait_for(lambda: proxy.status("tuned")["state"] == "stopped", timeout_s=5, what="tuned restart")
    assert proxy.chat("tuned", temperature=None).json()["echo"]["temperature"] == 0.7
    assert proxy.status("tuned")["pid"] != tuned_pid
    assert proxy.status("steady")["pid"] == steady_pid  # untouched
    assert proxy.chat("added").status_code == 200


def test_edited_files_are_picked_up_and_invalid_ones_are_refused(start_proxy: Start) -> None:
    proxy = start_proxy({"only": fake_profile()})
    assert proxy.chat("only").status_code == 200
    profiles = proxy.config_path.parent / "model_configs"
    (profiles / "broken.yml").write_text("backend: warp-drive\n")
    proxy.wait_for(lambda: "config not reloaded" in proxy.log(), timeout_s=6, what="refused reload")
    assert "broken.yml: backend: expected one of" in proxy.log()
    assert proxy.chat("only").status_code == 200  # still serving on the old config

    (profiles / "broken.yml").unlink()
    (profiles / "second.yml").write_text(yaml.safe_dump(fake_profile()))
    proxy.wait_for(lambda: proxy.chat("second").status_code == 200, timeout_s=6, what="new profile")

    tokens = proxy.config_path.parent / "api_tokens.yml"
    tokens.write_text(yaml.safe_dump({"api_key": "rotated-key-000000", "admin_key": "rotated-admin-000000"}))
    def rotated() -> bool:
        return proxy.http.get(proxy.url + "/v1/models", headers={"x-api-key": "rotated-key-000000"}).status_code == 200
    proxy.wait_for(rotated, timeout_s=6, what="new key")
    assert proxy.get("/v1/models").status_code == 401  # the old key is gone


def test_a_reload_keeps_the_command_line_port_without_warning(start_proxy: Start) -> None:
    # start_proxy always passes --port (config.yml says 9000): the CLI wins on every reload too
    proxy = start_proxy({"only": fake_profile()})
    (proxy.config_path.parent / "model_configs" / "added.yml").write_text(yaml.safe_dump(fake_profile()))
    proxy.popen.send_signal(signal.SIGHUP)
    proxy.wait_for(lambda: "config reloaded" in proxy.log(), timeout_s=5, what="reload")
    assert "proxy.port changed" not in proxy.log()
    assert "restart the proxy" not in proxy.log()
    assert proxy.chat("added").status_code == 200  # still serving on the --port it started on
