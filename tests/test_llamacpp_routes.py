"""llama.cpp's router-mode routes (/models, /models/load, /models/unload, /props) through the real
proxy.py in front of tests/fake_backend.py, and /props of a real llama.cpp profile (never started).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import ProxyProcess, fake_profile, llamacpp_profile

Start = Callable[..., ProxyProcess]
PROFILES: dict[str, dict[str, Any]] = {
    "fake": fake_profile(aliases=["fake-alias"], context_length=4096, template={"temperature": 0.3}),
    "slow": fake_profile("--token-delay", "0.2", "--tokens", "6"),
}


def status_values(proxy: ProxyProcess) -> dict[str, str]:
    answer = proxy.get("/models")
    assert answer.status_code == 200, answer.text
    return {entry["id"]: entry["status"]["value"] for entry in answer.json()["data"]}


def test_models_lists_every_profile_in_llamacpps_shape_with_its_context(start_proxy: Start) -> None:
    proxy = start_proxy(PROFILES)
    listing = proxy.get("/models").json()
    assert listing["object"] == "list"
    by_id = {entry["id"]: entry for entry in listing["data"]}
    assert set(by_id) == {"fake", "slow"}
    fake = by_id["fake"]
    assert fake["status"] == {"value": "unloaded", "args": ["--ctx-size", "4096"]}
    assert fake["meta"] == {"n_ctx": 4096} and fake["aliases"] == ["fake-alias"] and fake["object"] == "model"
    assert "meta" not in by_id["slow"] and by_id["slow"]["status"]["args"] == []  # nothing known


def test_load_and_unload_need_the_admin_key_and_answer_success(start_proxy: Start) -> None:
    proxy = start_proxy(PROFILES)
    refused = proxy.post("/models/load", {"model": "fake"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert proxy.http.post(proxy.url + "/models/load", json={"model": "fake"}).status_code == 401
    assert proxy.status("fake")["state"] == "stopped"

    loaded = proxy.post("/models/load", {"model": "fake-alias"}, admin=True)  # any name form
    assert loaded.status_code == 200 and loaded.json() == {"success": True}
    assert proxy.status("fake")["state"] == "ready" and status_values(proxy)["fake"] == "loaded"

    unloaded = proxy.post("/models/unload", {"model": "fake"}, admin=True)
    assert unloaded.status_code == 200 and unloaded.json() == {"success": True}
    assert proxy.status("fake")["state"] == "stopped" and status_values(proxy)["fake"] == "unloaded"


@pytest.mark.parametrize(("body", "status", "code"), [
    ({}, 400, "invalid_request"),
    ({"model": "nope"}, 404, "model_not_found"),
    ([1], 400, "invalid_request"),
])
def test_load_refuses_missing_and_unknown_models_in_openais_shape(start_proxy: Start, body: Any, status: int,
                                                                  code: str) -> None:
    proxy = start_proxy(PROFILES)
    for path in ("/models/load", "/models/unload"):
        answer = proxy.post(path, body, admin=True)
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]["code"] == code
    assert all(value == "unloaded" for value in status_values(proxy).values())


def test_unload_waits_for_the_running_answer(start_proxy: Start) -> None:
    proxy = start_proxy(PROFILES)
    stream = proxy.chat("slow", stream=True, max_tokens=6)  # about 1.2 s of tokens
    assert stream.status_code == 200
    done: dict[str, Any] = {}

    def unload() -> None:
        done["answer"] = proxy.post("/models/unload", {"model": "slow"}, admin=True)
        done["at"] = time.monotonic()

    thread = threading.Thread(target=unload)
    thread.start()
    proxy.wait_for(lambda: status_values(proxy)["slow"] == "loaded" and proxy.status("slow")["leases"] == 1,
                   what="the stream to hold its lease")
    body = b"".join(stream.iter_content(None))
    ended = time.monotonic()
    thread.join(30)
    assert b"[DONE]" in body  # never cut
    assert done["answer"].json() == {"success": True} and done["at"] >= ended - 0.05
    assert proxy.status("slow")["state"] == "stopped"


def test_props_answers_from_the_profile_without_loading(start_proxy: Start) -> None:
    proxy = start_proxy(PROFILES)
    answer = proxy.get("/props?model=fake-alias")
    assert answer.status_code == 200, answer.text
    props = answer.json()
    assert props["default_generation_settings"]["n_ctx"] == 4096
    assert props["default_generation_settings"]["params"] == {"temperature": 0.3}
    assert props["model_alias"] == "fake" and props["is_sleeping"] is True
    assert props["status"] == {"value": "unloaded"}
    assert proxy.status("fake")["state"] == "stopped" and not proxy.backends()

    proxy.post("/models/load", {"model": "fake"}, admin=True)
    assert proxy.get("/props?model=fake").json()["is_sleeping"] is False
    missing = proxy.get("/props?model=nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_props_of_a_real_llamacpp_profile_reports_its_n_ctx_without_starting_it(start_proxy: Start,
                                                                                 gguf: Path) -> None:
    proxy = start_proxy({"smol": llamacpp_profile(gguf)})
    props = proxy.get("/props?model=smol").json()
    assert props["default_generation_settings"]["n_ctx"] == 1024
    assert props["model_path"] == gguf.name  # the file's name, never the full path
    [entry] = proxy.get("/models").json()["data"]
    assert entry["status"] == {"value": "unloaded", "args": ["--ctx-size", "1024"]}
    assert proxy.status("smol")["state"] == "stopped" and not proxy.backends()
