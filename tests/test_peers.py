"""Peers: a front proxy that lists and routes to the models of other instances of the proxy.

Two real proxy.py processes, a front and a peer, with fake backends behind the peer; the peer is
"another machine" on loopback, or in a network namespace of its own (with its own address, made
unreachable by taking its link down) where this test can create one. The merge of the listings
with the local profiles is tested on its own, table-driven.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from proxy.config import Config, load_config
from proxy.endpoints import Endpoint
from proxy.peers import Conflict, PeerModel, merge, peer_models
from proxy.settings import PeerSettings
from tests.conftest import ADMIN_KEY, API_KEY, ROOT, ProxyProcess, fake_profile, free_port, write_config

PEER_API_KEY = "peer-api-key-0123456789"
PEER_ADMIN_KEY = "peer-admin-key-0123456789"


class Instance(ProxyProcess):
    """proxy.py with keys of its own, optionally started inside a network namespace on its address there."""

    def __init__(self, config_path: Path, port: int, *, host: str = "127.0.0.1", netns: str | None = None,
                 keys: tuple[str, str] | None = None) -> None:
        self.config_path = config_path
        self.port = port
        self.url = f"http://{host}:{port}"
        self.log_path = config_path.parent / "proxy.log"
        self._log = self.log_path.open("wb")
        self.keys = keys
        argv = [sys.executable, str(ROOT / "proxy.py"), "--config", str(config_path), "--port", str(port),
                "--host", host]
        # `ip netns exec` execs the program: its PID is the proxy's own.
        self.popen = subprocess.Popen((["ip", "netns", "exec", netns] if netns else []) + argv,
                                      cwd=config_path.parent, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.seen_backends: dict[int, float] = {}
        self.http = requests.Session()
        self.http.trust_env = False

    def headers(self, admin: bool = False) -> dict[str, str]:
        if self.keys is None:
            return super().headers(admin)
        return {"Authorization": f"Bearer {self.keys[1] if admin else self.keys[0]}"}

    def models(self) -> dict[str, dict[str, Any]]:
        return {card["id"]: card for card in self.get("/v1/models", timeout=10).json()["data"]}

    def peers(self) -> list[dict[str, Any]]:
        peers: list[dict[str, Any]] = self.get("/status", timeout=10).json()["peers"]
        return peers


Start = Callable[..., Instance]


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[Start]:
    """Factory: write a config and start proxy.py on it (a peer gets keys of its own); stop them all after."""
    started: list[Instance] = []

    def start(profiles: dict[str, dict[str, Any]], *, peer_keys: bool = False, host: str = "127.0.0.1",
              netns: str | None = None, port: int | None = None, **proxy: Any) -> Instance:
        path = write_config(tmp_path / f"proxy{len(started)}", profiles, proxy=proxy)
        keys = (PEER_API_KEY, PEER_ADMIN_KEY) if peer_keys else None
        if keys:
            (path.parent / "api_tokens.yml").write_text(yaml.safe_dump({"api_key": keys[0], "admin_key": keys[1]}))
        instance = Instance(path, port or free_port(), host=host, netns=netns, keys=keys)
        started.append(instance)
        instance.wait_healthy(30)
        return instance

    yield start
    leftovers = []
    for instance in started:
        instance.stop()
        leftovers += instance.kill_leftovers()
    assert not leftovers, f"backend processes outlived their proxy: {leftovers}"


def peer_entry(peer: Instance, **settings: Any) -> dict[str, Any]:
    return {"name": "box", "url": peer.url, "api_key": PEER_ADMIN_KEY, "refresh": 0.3, "timeout": 2, **settings}


def chunks_of(response: requests.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: {")]


def test_a_front_routes_to_its_peer_lists_its_models_and_forwards_keep_alive_and_unload(instances: Start) -> None:
    peer = instances({"alpha": fake_profile(), "shared": fake_profile(),
                      "slow": fake_profile("--token-delay", "0.2", "--tokens", "50")},
                     peer_keys=True, max_loaded_models=3)
    front = instances({"shared": fake_profile(), "local": fake_profile()}, peers=[peer_entry(peer)])
    front.wait_for(lambda: "alpha" in front.models(), timeout_s=10, what="the peer's models in the listing")

    # Routing: every dialect reaches the peer through its OpenAI routes.
    answer = front.chat("alpha", keep_alive="7m")
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "alpha" and "keep_alive" not in answer.json()["echo"]  # the peer took it out
    assert peer.status("alpha")["keep_alive_s"] == 420 and peer.status("alpha")["requests_served"] == 1
    with front.chat("alpha", stream=True) as stream:
        assert b"tok0" in stream.content and stream.content.rstrip().endswith(b"data: [DONE]")
    ollama = front.post("/api/chat", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                      "keep_alive": -1, "stream": False})
    assert ollama.status_code == 200 and ollama.json()["message"]["content"].startswith("tok0")
    assert peer.status("alpha")["keep_alive_s"] is None  # never unload, as the client asked the front
    anthropic = front.post("/v1/messages", {"model": "alpha", "max_tokens": 8,
                                            "messages": [{"role": "user", "content": "hi"}]})
    assert anthropic.status_code == 200 and anthropic.json()["content"][0]["text"].startswith("tok0")
    assert front.status("alpha")["pid"] is None and front.status("alpha")["peer"] == "box"
    assert front.backends() == []  # nothing runs on the front for its peer's models

    # Merged listings, with the peer's own state of its models.
    front.wait_for(lambda: front.models()["alpha"]["state"] == "ready", timeout_s=5, what="the peer's state")
    card = front.models()["alpha"]
    assert card["peer"] == "box" and card["backend"] == "command" and card["loaded"] is True
    assert front.models()["slow"]["state"] == "stopped"  # listed, never loaded anywhere
    assert "peer" not in front.models()["local"]
    tags = {model["name"] for model in front.get("/api/tags").json()["models"]}
    assert {"alpha:latest", "slow:latest", "local:latest", "shared:latest"} <= tags
    assert [model["name"] for model in front.get("/api/ps").json()["models"]] == ["alpha:latest"]
    listed = {entry["id"]: entry["status"]["value"] for entry in front.get("/models").json()["data"]}
    assert listed["alpha"] == "loaded" and listed["slow"] == "unloaded"
    [box] = front.peers()
    assert box["name"] == "box" and box["url"] == peer.url and box["reachable"] is True and box["error"] is None
    assert {model["name"]: model["state"] for model in box["models"]} == {
        "alpha": "ready", "shared": "stopped", "slow": "stopped"}
    assert box["conflicts"] == ["shared: served here and by peer box; the local profile wins (list it in that "
                                "peer's prefer to route it there)"]

    # The local profile wins a name conflict.
    assert front.chat("shared").status_code == 200
    assert front.status("shared")["backend"] == "command" and peer.status("shared")["requests_served"] == 0

    # /unload of a peer's model goes to the peer (whose key there is an admin key).
    unloaded = front.post("/unload", {"model": "alpha"}, admin=True)
    assert unloaded.status_code == 200 and unloaded.json() == {"unloaded": ["alpha"]}
    assert peer.status("alpha")["state"] == "stopped"
    loaded = front.post("/models/load", {"model": "slow"}, admin=True)
    assert loaded.status_code == 200 and peer.status("slow")["state"] == "ready"

    # A reload: the peer is preferred for `shared`, and its key there is no admin key any more.
    config = yaml.safe_load(front.config_path.read_text())
    config["proxy"]["peers"] = [peer_entry(peer, api_key=PEER_API_KEY, prefer=["shared"])]
    front.config_path.write_text(yaml.safe_dump(config))
    assert front.post("/reload", admin=True).status_code == 200
    front.wait_for(lambda: front.status("shared")["peer"] == "box", timeout_s=10, what="the preferred peer")
    assert front.chat("shared").status_code == 200 and peer.status("shared")["requests_served"] == 1
    refused = front.post("/unload", {"model": "alpha"}, admin=True)
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == (
        f"alpha: peer box at {peer.url} refused /unload: the api_key proxy.peers gives for it is not an admin key "
        "there (HTTP 403); nothing was changed there")
    assert front.peers()[0]["conflicts"] == ["shared: served here and by peer box; the peer's wins (its prefer "
                                             "lists it)"]

    # The peer goes down in the middle of a stream: the front's stream ends with the in-band error.
    with front.chat("slow", stream=True, max_tokens=50) as stream:
        lines = stream.iter_lines()
        assert b"tok0" in next(line for line in lines if b"tok0" in line)
        peer.backends()  # remembered, to check that none outlives its proxy
        os.kill(peer.popen.pid, signal.SIGKILL)
        rest = b"\n".join(lines)
    assert b'"code": "backend_failed"' in rest and b"[DONE]" not in rest
    front.wait_for(lambda: front.status("slow")["state"] == "stopped", timeout_s=5, what="slow marked gone")
    assert "unreachable" in front.status("slow")["last_error"]
    again = front.chat("slow")
    assert again.status_code == 502
    assert again.json()["error"]["message"] == f"slow: peer box at {peer.url} is unreachable: connection refused"
    front.wait_for(lambda: front.peers()[0]["reachable"] is False, timeout_s=5, what="the peer marked unreachable")
    assert "slow" in front.models()  # the last good listing is kept while the peer is down
    assert PEER_API_KEY not in front.log() and PEER_ADMIN_KEY not in front.log()
    peer.kill_leftovers()  # its backends, orphaned by the SIGKILL (the parent-death signal has them already)


def test_two_proxies_peering_with_each_other_do_not_relay_each_others_peers(instances: Start) -> None:
    first_port = free_port()
    second = instances({"two": fake_profile()}, peer_keys=True,
                       peers=[{"name": "first", "url": f"http://127.0.0.1:{first_port}", "api_key": API_KEY,
                               "refresh": 0.3}])
    first_path = write_config(second.config_path.parent.parent / "first", {"one": fake_profile()},
                              proxy={"peers": [peer_entry(second, name="second")]})
    first = Instance(first_path, first_port)
    try:
        first.wait_healthy(30)
        first.wait_for(lambda: "two" in first.models(), timeout_s=10, what="second's model on first")
        second.wait_for(lambda: "one" in second.models(), timeout_s=10, what="first's model on second")
        assert set(first.models()) == {"one", "two"} and set(second.models()) == {"one", "two"}
        assert first.chat("two").status_code == 200 and second.chat("one").status_code == 200
    finally:
        first.stop()


# ----- a peer in a network namespace: an address of its own, unreachable at will --------------------------

class Namespace:
    """A network namespace with a veth pair to it: the host side 10.x.y.1/30, the peer's side 10.x.y.2/30."""

    def __init__(self) -> None:
        chance = random.SystemRandom()
        tag = f"{os.getpid() % 10000}{chance.randrange(1000):03d}"
        self.name = f"mpt{tag}"
        self.host_link, self.peer_link = f"mph{tag}", f"mpp{tag}"
        self.host_address = self.address = ""
        self._made: list[list[str]] = []

    def create(self) -> None:
        chance = random.SystemRandom()
        for _ in range(20):  # a /30 that no address or route of this machine (another test run's) uses yet
            prefix = f"10.213.{chance.randrange(256)}.{4 * chance.randrange(64)}"
            used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout + \
                subprocess.run(["ip", "-o", "route"], capture_output=True, text=True, timeout=10).stdout
            if prefix.rsplit(".", 1)[0] + "." not in used:
                break
        base = prefix.rsplit(".", 1)
        self.host_address = f"{base[0]}.{int(base[1]) + 1}"
        self.address = f"{base[0]}.{int(base[1]) + 2}"
        self._ip("netns", "add", self.name)
        self._made.append(["netns", "del", self.name])
        self._ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.peer_link)
        self._made.append(["link", "del", self.host_link])
        self._ip("link", "set", self.peer_link, "netns", self.name)
        self._ip("addr", "add", f"{self.host_address}/30", "dev", self.host_link)
        self._ip("link", "set", self.host_link, "up")
        self.inside("addr", "add", f"{self.address}/30", "dev", self.peer_link)
        self.inside("link", "set", self.peer_link, "up")
        self.inside("link", "set", "lo", "up")  # the peer's own backends listen on its loopback

    def cut(self) -> None:
        """Make the peer unreachable: its side of the link goes down (the host keeps its route, so packets
        for it are dropped here and never take the default route)."""
        self.inside("link", "set", self.peer_link, "down")

    def mend(self) -> None:
        self.inside("link", "set", self.peer_link, "up")

    def inside(self, *args: str) -> None:
        self._ip("netns", "exec", self.name, "ip", *args)

    def delete(self) -> None:
        for command in reversed(self._made):  # only what this test made, by the names it chose
            subprocess.run(["ip", *command], capture_output=True, timeout=10, check=False)

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], capture_output=True, timeout=10, check=True)


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    space = Namespace()
    try:
        space.create()
    except (OSError, subprocess.SubprocessError) as exc:
        space.delete()
        detail = getattr(exc, "stderr", b"") or b""
        reason = f"network namespaces cannot be created here ({exc}: {detail.decode(errors='replace').strip()})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield space
    finally:
        space.delete()


def test_a_peer_on_another_address_is_picked_up_when_it_comes_up_and_checked_again_when_cut_off(
        instances: Start, namespace: Namespace) -> None:
    peer_port = free_port()
    url = f"http://{namespace.address}:{peer_port}"
    front = instances({"local": fake_profile()},
                      peers=[{"name": "box", "url": url, "api_key": PEER_ADMIN_KEY, "refresh": 0.3, "timeout": 1}],
                      connect_timeout=1, read_timeout=3)
    front.wait_for(lambda: front.peers()[0]["reachable"] is False, timeout_s=10, what="the peer found down")
    assert set(front.models()) == {"local"}  # starts, and lists nothing of a peer that is down
    assert front.peers()[0]["error"].startswith("unreachable: ")

    peer = instances({"far": fake_profile()}, peer_keys=True, host=namespace.address, netns=namespace.name,
                     port=peer_port)
    front.wait_for(lambda: "far" in front.models(), timeout_s=10, what="the peer's model once it is up")
    assert front.chat("far").status_code == 200
    assert peer.status("far")["requests_served"] == 1

    namespace.cut()
    cut_off = front.chat("far")
    assert cut_off.status_code in (502, 504), cut_off.text
    front.wait_for(lambda: front.status("far")["state"] == "stopped", timeout_s=5, what="far marked gone")
    assert "unreachable" in front.status("far")["last_error"]
    refused = front.chat("far")  # checked again: still cut off
    assert refused.status_code == 502 and "is unreachable: no answer within 1s" in refused.json()["error"]["message"]
    assert "far" in front.models()  # the last good listing, kept

    namespace.mend()
    front.wait_for(lambda: front.peers()[0]["reachable"] is True, timeout_s=10, what="the peer back")
    assert front.chat("far").status_code == 200


# ----- the merge, on its own ------------------------------------------------------------------------

def local_config(tmp_path: Path, *names: str, aliases: dict[str, list[str]] | None = None) -> Config:
    profiles = {name: fake_profile(aliases=(aliases or {}).get(name, [])) for name in names}
    return load_config(write_config(tmp_path, profiles))


def listing(name: str, *models: PeerModel, prefer: tuple[str, ...] = ()) -> tuple[PeerSettings, tuple[PeerModel, ...]]:
    return PeerSettings(name, Endpoint(f"http://{name}:9000"), prefer), models


@pytest.mark.parametrize("local, aliases, peers, served, conflicts", [
    pytest.param(("a",), {}, [listing("p", PeerModel("b"))], {"a": "local", "b": "p"}, [], id="no-conflict"),
    pytest.param(("a",), {}, [listing("p", PeerModel("a"), PeerModel("b"))], {"a": "local", "b": "p"},
                 [Conflict("a", "local", "p", False)], id="the-local-profile-wins"),
    pytest.param(("a",), {}, [listing("p", PeerModel("A"), prefer=("a",))], {"A": "p"},
                 [Conflict("a", "p", "local", True)], id="a-peer-that-prefers-a-name-wins-it"),
    pytest.param((), {}, [listing("p", PeerModel("m")), listing("q", PeerModel("m"))], {"m": "p"},
                 [Conflict("m", "p", "q", False)], id="two-peers-the-first-wins"),
    pytest.param((), {}, [listing("p", PeerModel("m")), listing("q", PeerModel("m"), prefer=("m",))], {"m": "q"},
                 [Conflict("m", "q", "p", True)], id="two-peers-prefer-decides"),
    pytest.param(("a",), {"a": ["fast"]}, [listing("p", PeerModel("b", aliases=("fast", "bee")))],
                 {"a": "local", "b": "p", "bee": "p", "fast": "local"}, [Conflict("fast", "local", "p", False)],
                 id="a-lost-alias-leaves-the-rest"),
    pytest.param(("a",), {"a": ["fast"]}, [listing("p", PeerModel("fast"), prefer=("fast",))],
                 {"a": "local", "fast": "p"}, [Conflict("fast", "p", "local", True)],
                 id="a-preferred-peer-takes-an-alias-of-a-local-profile"),
])
def test_merge_settles_every_name_once(tmp_path: Path, local: tuple[str, ...], aliases: dict[str, list[str]],
                                       peers: list[tuple[PeerSettings, tuple[PeerModel, ...]]],
                                       served: dict[str, str], conflicts: list[Conflict]) -> None:
    merged, found = merge(local_config(tmp_path, *local, aliases=aliases), peers)
    owners = {}
    for name in merged.names:
        model = merged.models[merged.names[name]]
        owners[name] = model.remote.peer if model.remote is not None and model.remote.peer else "local"
    assert owners == {name.lower(): owner for name, owner in served.items()}
    assert found == conflicts


def test_a_peers_own_peer_models_are_never_listed() -> None:
    listing_ = {"object": "list", "data": [
        {"id": "mine", "aliases": ["m"], "state": "ready", "backend": "llamacpp"},
        {"id": "relayed", "aliases": [], "state": "ready", "backend": "command", "peer": "elsewhere"},
        {"id": "bad name!", "state": "ready"},
    ]}
    assert peer_models(listing_) == (PeerModel("mine", ("m",), "ready", "llamacpp"),)
    with pytest.raises(ValueError):
        peer_models({"detail": "not a listing"})


def test_the_dashboards_load_and_unload_of_a_peers_model_go_to_the_peer(instances: Start) -> None:
    peer = instances({"alpha": fake_profile()}, peer_keys=True)
    front = instances({"local": fake_profile()}, peers=[peer_entry(peer)])
    front.wait_for(lambda: "alpha" in front.models(), timeout_s=10, what="the peer's models in the listing")
    browser = requests.Session()
    browser.trust_env = False
    login = browser.post(front.url + "/ui/login", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert login.status_code == 200 and login.json()["admin"] is True
    page = browser.get(front.url + "/ui", timeout=10).text
    csrf = page.split('<meta name="csrf-token" content="', 1)[1].split('"', 1)[0]

    loading = browser.post(front.url + "/ui/load?model=alpha", headers={"X-CSRF-Token": csrf}, timeout=10)
    assert loading.status_code == 202, loading.text
    front.wait_for(lambda: peer.status("alpha")["state"] == "ready", timeout_s=15, what="alpha loaded on the peer")
    assert front.backends() == []  # the front started nothing for it

    unloading = browser.post(front.url + "/ui/unload?model=alpha", headers={"X-CSRF-Token": csrf}, timeout=10)
    assert unloading.status_code == 202, unloading.text
    front.wait_for(lambda: peer.status("alpha")["state"] == "stopped", timeout_s=15, what="alpha unloaded there")
