"""Dashboard sessions: a signed cookie that names the key which logged in (never the key itself), its
admin flag, when it was issued and its CSRF token; signed with a secret kept in `state_dir/ui_secret`
(mode 0600), so sessions survive a restart. A session holds only while its key is still configured.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

from proxy.auth import KeyEntry, Keys

log = logging.getLogger(__name__)

COOKIE = "proxy_ui"
SECRET_FILE = "ui_secret"
SESSION_S = 12 * 3600          # a session's life; the cookie expires then too
SALT = "model-proxy.ui-session"
CLOCK_SKEW_S = 60.0            # a session issued "in the future" by this much is refused


@dataclass(frozen=True, slots=True)
class Session:
    """What the cookie carries, once its signature is checked."""

    key: str | None       # the key's name; None for the open dashboard (proxy.disable_auth)
    admin: bool
    fingerprint: str      # an HMAC of the key's value under the secret: a rotated key ends its sessions
    csrf: str             # the token state-changing requests must echo (X-CSRF-Token)
    issued_at: float      # wall clock


class Sessions:
    """Issue and check session cookies. Thread-safe; the secret is read (or made) on first use."""

    def __init__(self, state_dir: Path, lifetime_s: float = SESSION_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.secret_path = state_dir / SECRET_FILE
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._lock = threading.Lock()
        self._secret: bytes | None = None  # guarded by _lock

    def issue(self, entry: KeyEntry | None) -> tuple[str, Session]:
        """Return a new session for a key (None: the open dashboard) and the cookie value that carries it."""
        session = Session(
            key=None if entry is None else entry.name,
            admin=True if entry is None else entry.admin,
            fingerprint="" if entry is None else self._fingerprint(entry),
            csrf=secrets.token_urlsafe(32),
            issued_at=self._clock(),
        )
        payload = {"k": session.key, "a": session.admin, "f": session.fingerprint, "c": session.csrf,
                   "t": session.issued_at}
        return str(self._serializer().dumps(payload)), session

    def read(self, cookie: str | None) -> Session | None:
        """Return the session a cookie carries, or None when it is missing, forged, malformed or expired."""
        if not cookie or len(cookie) > 4096:
            return None
        try:
            payload: Any = self._serializer().loads(cookie)
        except BadSignature:
            return None
        if not isinstance(payload, dict):
            return None
        key, admin, fingerprint = payload.get("k"), payload.get("a"), payload.get("f")
        csrf, issued_at = payload.get("c"), payload.get("t")
        if not (key is None or isinstance(key, str)) or not isinstance(admin, bool):
            return None
        if not isinstance(fingerprint, str) or not isinstance(csrf, str) or not csrf:
            return None
        if not isinstance(issued_at, int | float) or isinstance(issued_at, bool):
            return None
        age = self._clock() - issued_at
        if age >= self.lifetime_s or age < -CLOCK_SKEW_S:
            return None
        return Session(key, admin, fingerprint, csrf, float(issued_at))

    def holder(self, session: Session, keys: Keys) -> KeyEntry | None:
        """Return the configured key a session belongs to, or None when it was removed or rotated since."""
        if session.key is None:
            return None
        for entry in keys.entries:
            if entry.name == session.key:
                if hmac.compare_digest(self._fingerprint(entry), session.fingerprint):
                    return entry
                return None
        return None

    def expires_at(self, session: Session) -> float:
        """Return when a session ends (wall clock): the cookie's Expires."""
        return session.issued_at + self.lifetime_s

    @staticmethod
    def csrf_matches(session: Session | None, token: str | None) -> bool:
        """Say whether a request's CSRF token is its session's (constant time)."""
        if session is None or not token:
            return False
        return hmac.compare_digest(token.encode(), session.csrf.encode())

    def _fingerprint(self, entry: KeyEntry) -> str:
        return hmac.new(self._load_secret(), b"key:" + entry.key.encode(), hashlib.sha256).hexdigest()[:32]

    def _serializer(self) -> URLSafeSerializer:
        return URLSafeSerializer(self._load_secret(), salt=SALT)

    def _load_secret(self) -> bytes:
        with self._lock:
            if self._secret is None:
                self._secret = read_or_create_secret(self.secret_path)
            return self._secret


def read_or_create_secret(path: Path) -> bytes:
    """Return the signing secret in `path`, creating it (random, mode 0600) when missing or unusable.

    Created under a temporary name and linked into place, so two processes never see half a secret.
    """
    try:
        text = path.read_text(encoding="ascii").strip()
        if len(text) >= 32:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
                log.warning("%s was readable by others; made it readable by its owner only", path)
            return text.encode()
        log.warning("%s is too short to be a signing secret; making a new one (dashboard sessions end)", path)
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s is unreadable (%s); making a new one (dashboard sessions end)", path,
                    getattr(exc, "strerror", None) or type(exc).__name__)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    secret = secrets.token_hex(32)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as sink:
            sink.write(secret + "\n")
            sink.flush()
            os.fsync(sink.fileno())
        if path.exists():
            os.replace(temporary, path)  # the unusable one found above
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:  # another process made one meanwhile: use theirs
                return path.read_text(encoding="ascii").strip().encode()
    finally:
        temporary.unlink(missing_ok=True)
    log.info("created %s (the dashboard's session secret)", path)
    return secret.encode()
