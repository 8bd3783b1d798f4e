"""proxy/server.py reaches into waitress's internals where waitress has no hook (a write timeout,
arrival deadlines, refusing a body early). These tests fail loudly when waitress changes under it;
the behaviour itself is tested through the real proxy.py in test_slow_clients.py and test_connections.py.
"""

from __future__ import annotations

import importlib.metadata
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer

from proxy.auth import Keys
from proxy.config import ProxySettings
from proxy.server import OUTBUF_HIGH_WATERMARK, _require_internals, create_server
from tests.conftest import ROOT


def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"ok"


def test_waitress_is_the_version_the_hooks_were_written_for() -> None:
    pinned = re.search(r"^waitress==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert pinned is not None
    assert importlib.metadata.version("waitress") == pinned.group(1), (
        "waitress changed: re-read its channel.py, parser.py and server.py against proxy/server.py's "
        "install_hooks() before moving the pin")


def test_the_hooks_install_on_a_real_waitress_server() -> None:
    server = create_server(app, ProxySettings(port=0), lambda: Keys(()))
    try:
        assert isinstance(server, BaseWSGIServer)
        assert issubclass(server.channel_class.parser_class, HTTPRequestParser)
        assert server.channel_class.parser_class is not HTTPRequestParser  # ours, with the early check
        assert server.maintenance.__name__ == "maintain"  # wrapped: timeouts for stalled connections
        assert server.adj.outbuf_high_watermark == OUTBUF_HIGH_WATERMARK
        assert server.adj.connection_limit == ProxySettings().connection_limit
        assert server.adj.cleanup_interval == 1
    finally:
        server.close()


def test_missing_internals_stop_the_proxy_at_startup() -> None:
    with pytest.raises(RuntimeError, match="server.channel_class"):
        _require_internals([object()])
    with pytest.raises(RuntimeError, match="a listening server"):
        _require_internals([])


def test_each_channel_gives_its_parsers_the_peer_address() -> None:
    # The early key check needs the peer (proxy.loopback_without_key): the channel waitress makes per
    # connection with (server, sock, addr, adj, map) builds its parsers with self.parser_class(self.adj).
    server = create_server(app, ProxySettings(port=0, loopback_without_key=True), lambda: Keys(()))
    ours, theirs = socket.socketpair()
    try:
        channel = server.channel_class(server, ours, ("127.0.0.1", 50000), server.adj, map={})
        parser = channel.parser_class(channel.adj)
        assert isinstance(parser, HTTPRequestParser)
        assert parser.peer == "127.0.0.1"
        channel.close()
    finally:
        theirs.close()
        server.close()
