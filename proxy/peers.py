"""Peers: other instances of this proxy. A background thread reads each peer's /v1/models (the last
good listing is kept while it is down); its models become remote profiles routed to it, merged over
the local config (conflicts settled by `prefer`) and applied through manager.reload.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import requests

from proxy.backends.remote import connection_reason
from proxy.config import Config, ModelConfig, RemoteSettings, with_models
from proxy.dialects.backend import error_message_from_upstream
from proxy.errors import BackendFailed, BackendTimeout, UpstreamError
from proxy.manager import ModelManager
from proxy.profiles import ALIAS_NAME, BACKEND_KINDS, MODEL_NAME
from proxy.settings import PeerSettings

log = logging.getLogger(__name__)

IDLE_WAKE_S = 60.0  # with no peer due, the thread looks again at least this often


@dataclass(frozen=True, slots=True)
class PeerModel:
    """One model as a peer lists it in its /v1/models."""

    name: str
    aliases: tuple[str, ...] = ()
    state: str = "stopped"  # the peer's own state of it: stopped, starting, ready, stopping, failed
    backend: str = ""       # the kind the peer runs it on
    description: str = ""


@dataclass(frozen=True, slots=True)
class Conflict:
    """A name two sources claim, and which one serves it."""

    name: str
    winner: str  # "local", or a peer's name
    loser: str
    preferred: bool  # the winner is a peer whose `prefer` lists the name

    def describe(self) -> str:
        if self.loser == "local":
            return f"{self.name}: served here and by peer {self.winner}; the peer's wins (its prefer lists it)"
        if self.winner == "local":
            return (f"{self.name}: served here and by peer {self.loser}; the local profile wins (list it in that "
                    "peer's prefer to route it there)")
        how = "its prefer lists it" if self.preferred else "it comes first in proxy.peers"
        return f"{self.name}: served by peers {self.winner} and {self.loser}; {self.winner}'s wins ({how})"


@dataclass(slots=True)
class Listing:
    """What this proxy knows of one peer (guarded by Peers._lock)."""

    peer: PeerSettings
    models: tuple[PeerModel, ...] = ()  # the last good reading, kept while the peer is down
    reachable: bool | None = None       # None: not read yet
    refreshed_at: float | None = None   # wall clock of the last good reading
    error: str | None = None            # why the last reading failed
    due: float = 0.0                    # monotonic: when to read it next


# ----- merging: pure ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Candidate:
    model: ModelConfig
    origin: int  # -1: a local profile; else the peer's position in proxy.peers
    source: str  # "local" or the peer's name
    prefer: frozenset[str] = frozenset()

    def rank(self, name: str) -> tuple[int, int]:
        """Order the claims on `name`: a peer that prefers it, then the local profile, then peers in order."""
        if self.origin >= 0 and name in self.prefer:
            return 0, self.origin
        return (1, 0) if self.origin < 0 else (2, self.origin)


def peer_profile(peer: PeerSettings, model: PeerModel, config: Config) -> ModelConfig:
    """Return the remote profile through which this proxy serves a peer's model."""
    return ModelConfig(
        name=model.name,
        backend="remote",
        source=config.path,  # where the peer is named
        aliases=model.aliases,
        description=model.description,
        remote=RemoteSettings(endpoint=peer.endpoint, model_id=model.name, timeout_s=peer.timeout_s, peer=peer.name,
                              serves=model.backend if model.backend in BACKEND_KINDS else None),
        backend_model=model.name,
    )


def merge(local: Config, listings: Sequence[tuple[PeerSettings, Sequence[PeerModel]]]) -> tuple[Config, list[Conflict]]:
    """Return the local config serving the peers' models too, and the name conflicts and how they were settled.

    A name (or alias, case-insensitively) claimed twice goes to a peer whose `prefer` lists it (the
    first such), else to the local profile, else to the first peer in order. A model that loses its
    own name is left out; one that loses an alias keeps the rest.
    """
    candidates = [_Candidate(model, -1, "local") for model in local.models.values()]
    for origin, (peer, listed) in enumerate(listings):
        prefer = frozenset(name.lower() for name in peer.prefer)
        candidates += [_Candidate(peer_profile(peer, model, local), origin, peer.name, prefer) for model in listed]
    dropped: set[int] = set()
    while True:
        owners = _owners(candidates, dropped)
        lost = {index for index, candidate in enumerate(candidates)
                if index not in dropped and owners[candidate.model.name.lower()] != index}
        if not lost:
            break
        dropped |= lost
    conflicts = _conflicts(candidates, owners)
    models: dict[str, ModelConfig] = {}
    for index, candidate in enumerate(candidates):
        if index in dropped:
            continue
        model = candidate.model
        kept = tuple(alias for alias in model.aliases if owners.get(alias.lower()) == index)
        models[model.name] = model if kept == model.aliases else dataclasses.replace(model, aliases=kept)
    return with_models(local, models), conflicts


def _owners(candidates: list[_Candidate], dropped: set[int]) -> dict[str, int]:
    """Return, for every name the kept candidates claim, the candidate that serves it."""
    claims: dict[str, list[int]] = {}
    for index, candidate in enumerate(candidates):
        if index not in dropped:
            for name in dict.fromkeys(name.lower() for name in (candidate.model.name, *candidate.model.aliases)):
                claims.setdefault(name, []).append(index)
    return {name: min(claimants, key=lambda index: candidates[index].rank(name)) for name, claimants in claims.items()}


def _conflicts(candidates: list[_Candidate], owners: dict[str, int]) -> list[Conflict]:
    conflicts = []
    for index, candidate in enumerate(candidates):
        for name in dict.fromkeys((candidate.model.name, *candidate.model.aliases)):
            owner = owners.get(name.lower())
            if owner is not None and owner != index:
                winner = candidates[owner]
                conflicts.append(Conflict(name, winner.source, candidate.source,
                                          winner.origin >= 0 and name.lower() in winner.prefer))
    return conflicts


def peer_models(listing: Any) -> tuple[PeerModel, ...]:
    """Return the models in a peer's /v1/models; raise ValueError when it is not a model listing.

    Cards marked `peer` are that peer's own peers' models: never passed on, so that proxies which
    peer with each other do not route in circles.
    """
    cards = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(cards, list):
        raise ValueError("its /v1/models is not a model listing")
    models = []
    for card in cards:
        if not isinstance(card, dict) or card.get("peer") is not None:
            continue
        name = card.get("id")
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            continue
        aliases = tuple(alias for alias in card.get("aliases") or []
                        if isinstance(alias, str) and ALIAS_NAME.fullmatch(alias))
        state = card.get("state")
        models.append(PeerModel(name, aliases,
                                state if isinstance(state, str) else "ready" if card.get("loaded") else "stopped",
                                str(card.get("backend") or ""), str(card.get("description") or "")))
    return tuple(models)


# ----- the peers, read in the background ---------------------------------------------------------------

Fetch = Callable[[PeerSettings], Any]
"""Return a peer's /v1/models answer, parsed; raise ValueError or requests' errors when it cannot."""


class Peers:
    """The peers' listings, refreshed by one daemon thread, and the config they make with the local one.

    The local config (the files) stays the source of truth: a reload goes through apply(), which
    merges it with the last listings. Publishing goes through manager.reload, one at a time.
    """

    def __init__(self, manager: ModelManager, fetch: Fetch | None = None) -> None:
        self._manager = manager
        self._fetch = fetch or self._get_listing
        self._http = requests.Session()
        self._http.trust_env = False  # as the upstream client: never through an HTTP(S)_PROXY
        self._lock = threading.Lock()
        self._publishing = threading.Lock()  # one publication at a time: a reload and a refresh never interleave
        self._local = manager.config         # guarded by _lock
        self._listings = {peer.name: Listing(peer) for peer in self._local.proxy.peers}  # guarded by _lock
        self._conflicts: list[Conflict] = []  # guarded by _lock
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the refresher (a daemon thread); it reads every peer at once, then every `refresh` seconds."""
        self._thread = threading.Thread(target=self._run, name="peers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._http.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.refresh()
            except Exception:  # one bad round must not end the refresher
                log.exception("peers: refresh failed")
            with self._lock:
                due = min((listing.due for listing in self._listings.values()), default=math.inf)
            self._wake.wait(min(IDLE_WAKE_S, max(0.05, due - time.monotonic())))
            self._wake.clear()

    # ----- reading ----------------------------------------------------------------------------------

    def refresh(self, *, all_now: bool = False) -> None:
        """Read every peer that is due (all_now: every peer) and publish what changed. Blocks for the readings."""
        now = time.monotonic()
        with self._lock:
            due = [listing.peer for listing in self._listings.values() if all_now or listing.due <= now]
        if not due:
            return
        for peer in due:
            models, error = self._read(peer)
            with self._lock:
                listing = self._listings.get(peer.name)
                if listing is None or listing.peer != peer:
                    continue  # a reload removed or changed it meanwhile
                listing.due = time.monotonic() + peer.refresh_s
                was = listing.reachable
                listing.reachable = error is None
                listing.error = error
                if models is not None:
                    listing.models = models
                    listing.refreshed_at = time.time()
            if error is not None and was is not False:
                log.warning("peer %s at %s: %s; its models are listed as last read (%d)", peer.name,
                            peer.endpoint.url, error, len(listing.models))
            elif error is None and was is False:
                log.info("peer %s at %s: reachable again", peer.name, peer.endpoint.url)
        self._publish(only_if_changed=True)

    def _read(self, peer: PeerSettings) -> tuple[tuple[PeerModel, ...] | None, str | None]:
        try:
            return peer_models(self._fetch(peer)), None
        except requests.Timeout:
            return None, f"no answer within {peer.timeout_s:g}s"
        except requests.RequestException as exc:
            return None, f"unreachable: {connection_reason(exc)}"
        except ValueError as exc:
            return None, str(exc)

    def _get_listing(self, peer: PeerSettings) -> Any:
        response = self._http.get(peer.endpoint.url + "/v1/models", headers=dict(peer.endpoint.headers),
                                  timeout=peer.timeout_s, allow_redirects=False)
        with response:
            if response.status_code in (401, 403):
                raise ValueError(f"it refused the proxy's key (HTTP {response.status_code}); check proxy.peers' "
                                 "api_key")
            if response.status_code != 200:
                raise ValueError(f"its /v1/models answered HTTP {response.status_code}")
            return response.json()  # a ValueError when it is not JSON

    # ----- publishing ---------------------------------------------------------------------------------

    def apply(self, local: Config) -> list[str]:
        """Adopt a config read from the files (a reload): its peers, merged with their last listings.

        Returns the models that must restart, as manager.reload does; the caller unloads them.
        """
        with self._lock:
            self._local = local
            old = self._listings
            self._listings = {}
            for peer in local.proxy.peers:
                kept = old.get(peer.name)
                same = kept is not None and kept.peer.endpoint == peer.endpoint
                self._listings[peer.name] = dataclasses.replace(kept, peer=peer) if same and kept else Listing(peer)
        self._wake.set()  # a new peer is read at once
        return self._publish(only_if_changed=False)

    def _publish(self, *, only_if_changed: bool) -> list[str]:
        with self._publishing:
            with self._lock:
                local = self._local
                listings = [(listing.peer, listing.models) for listing in self._listings.values()]
                before = set(self._conflicts)
            merged, conflicts = merge(local, listings)
            with self._lock:
                self._conflicts = conflicts
            for conflict in conflicts:
                if conflict not in before:
                    log.warning("name conflict: %s", conflict.describe())
            current = self._manager.config
            if only_if_changed and merged.models == current.models and merged.proxy == current.proxy:
                return []
            restart = self._manager.reload(merged)
        if only_if_changed and restart:  # a peer's model changed or went: it stops once its requests end
            threading.Thread(target=self._restart, args=(restart, merged.proxy.queue_timeout_s),
                             name="peers-restart", daemon=True).start()
        return restart

    def _restart(self, names: list[str], timeout_s: float) -> None:
        for name in names:
            try:
                self._manager.unload(name, timeout_s=timeout_s, cause="reload")
            except Exception as exc:  # still busy, or gone meanwhile: the idle timer stops it later
                log.info("model %s: not restarted after the peers changed: %s", name, exc)

    # ----- views ------------------------------------------------------------------------------------

    def reported_state(self, model: ModelConfig) -> str | None:
        """Return the state a peer reports for one of its models (None: not a peer's model, or unknown)."""
        peer = model.remote.peer if model.remote is not None else None
        if peer is None:
            return None
        with self._lock:
            listing = self._listings.get(peer)
            found = None if listing is None else next((item for item in listing.models
                                                       if item.name == model.upstream_model), None)
        return None if found is None else found.state

    def status(self) -> list[dict[str, Any]]:
        """Return /status's `peers`: each peer, whether it answered, when, its models and its conflicts."""
        with self._lock:
            listings = [dataclasses.replace(listing) for listing in self._listings.values()]
            conflicts = list(self._conflicts)
        return [{
            "name": listing.peer.name,
            "url": listing.peer.endpoint.url,
            "reachable": listing.reachable,
            "refreshed_at": None if listing.refreshed_at is None
            else datetime.fromtimestamp(listing.refreshed_at, timezone.utc).isoformat(),
            "error": listing.error,
            "models": [{"name": model.name, "aliases": list(model.aliases), "state": model.state,
                        "backend": model.backend} for model in listing.models],
            "conflicts": [conflict.describe() for conflict in conflicts
                          if listing.peer.name in (conflict.winner, conflict.loser)],
        } for listing in listings]

    # ----- requests the peer's own scheduler answers ----------------------------------------------

    def forward(self, model: ModelConfig, path: str, body: Mapping[str, Any]) -> Any:
        """POST `body` to `path` on the peer that serves `model` (its /unload, /models/load, ...); return
        its JSON answer. Waits up to proxy.queue_timeout, as the peer does.

        Raises BackendFailed (unreachable), BackendTimeout, or UpstreamError with the peer's own status:
        401 and 403 say that the key proxy.peers gives is not valid, or not an admin key, there.
        """
        remote = model.remote
        assert remote is not None and remote.peer is not None, "only a peer's model is forwarded"
        where = f"peer {remote.peer} at {remote.endpoint.url}"
        timeout = (remote.timeout_s, self._manager.config.proxy.queue_timeout_s + remote.timeout_s)
        try:
            response = self._http.post(remote.endpoint.url + path, json=dict(body),
                                       headers=dict(remote.endpoint.headers), timeout=timeout, allow_redirects=False)
        except requests.Timeout as exc:
            raise BackendTimeout(f"{model.name}: {where} did not answer {path} in time") from exc
        except requests.RequestException as exc:
            raise BackendFailed(f"{model.name}: {where} is unreachable: {connection_reason(exc)}") from exc
        with response:
            status, content = response.status_code, response.content
        if status == 401:
            raise UpstreamError(401, f"{model.name}: {where} refused {path}: the api_key proxy.peers gives for "
                                     "it is not a key there (HTTP 401)")
        if status == 403:
            raise UpstreamError(403, f"{model.name}: {where} refused {path}: the api_key proxy.peers gives for "
                                     "it is not an admin key there (HTTP 403); nothing was changed there")
        if status != 200:
            raise UpstreamError(status, f"{model.name}: {where}: {error_message_from_upstream(content, status)}")
        try:
            return response.json()
        except ValueError:
            return None


def is_peer_model(model: ModelConfig) -> bool:
    """Say whether a profile is a peer's model (requests for it are that peer's to schedule)."""
    return model.remote is not None and model.remote.peer is not None
