"""proxy/streaming.py at the byte level: SSE parsing, NDJSON framing, relay() and replacing()."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import BackendFailed, BackendTimeout, ProxyError, sse_error_event
from proxy.streaming import ChunkedDecoder, ndjson, relay, replacing, sse_data

# ----- sse_data --------------------------------------------------------------------------------------

LLAMACPP_STREAM = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
    b": ping\n\n"
    b'data: {"choices":[{"index":0,"delta":{"content":"lo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x99\x82"}}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)
LLAMACPP_EVENTS = [
    '{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}',
    '{"choices":[{"index":0,"delta":{"content":"Hel"}}]}',
    '{"choices":[{"index":0,"delta":{"content":"lo 世界 🙂"}}]}',
    '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}',
    "[DONE]",
]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_sse_events_come_out_whole_with_lf_or_crlf_framing(newline: bytes) -> None:
    stream = LLAMACPP_STREAM.replace(b"\n", newline)
    assert list(sse_data([stream])) == LLAMACPP_EVENTS


@pytest.mark.parametrize(
    ("stream", "events"),
    [
        (b"data: a\n\ndata: b\n\n", ["a", "b"]),
        (b"data:no-space\n\n", ["no-space"]),
        (b"data:  two spaces\n\n", [" two spaces"]),          # only one leading space is framing
        (b"data: line one\ndata: line two\ndata:three\n\n", ["line one\nline two\nthree"]),
        (b": ping\n\n", []),
        (b": ping\n\n: keep-alive\n\ndata: x\n\n", ["x"]),
        (b": comment inside\ndata: x\n\n", ["x"]),
        (b"event: message\nid: 7\nretry: 1000\ndata: x\n\n", ["x"]),
        (b"event: ping\n\n", []),
        (b"data: \n\n", [""]),
        (b"data: a\n\ndata: last", ["a", "last"]),            # the backend did not terminate its last event
        (b"data: a\n\ndata: last\n", ["a", "last"]),
        (b"data: a\r\n\r\ndata: last\r\n", ["a", "last"]),
        (b"\n\n\n\ndata: a\n\n\n\n", ["a"]),
        (b"", []),
        (b"data: {\"error\":{\"message\":\"boom\"}}\n\n", ['{"error":{"message":"boom"}}']),
    ],
)
def test_sse_framing_cases(stream: bytes, events: list[str]) -> None:
    assert list(sse_data([stream])) == events


def test_sse_events_are_yielded_as_soon_as_they_complete() -> None:
    def chunks() -> Iterator[bytes]:
        yield b"data: first\n"
        yield b"\ndata: sec"
        yield b"ond\n\n"
        raise AssertionError("read past the second event")

    events = sse_data(chunks())
    assert next(events) == "first"
    assert next(events) == "second"


def test_sse_crlf_split_between_chunks() -> None:
    assert list(sse_data([b"data: a\r", b"\n\r", b"\n", b"data: b\r\n\r\n"])) == ["a", "b"]


def test_sse_multibyte_character_split_between_chunks() -> None:
    encoded = "data: 世界\n\n".encode()
    assert list(sse_data([encoded[:8], encoded[8:]])) == ["世界"]


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(stream)]
    return [stream[start:end] for start, end in zip(points, points[1:])]


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(LLAMACPP_STREAM)), max_size=40),
       crlf=st.booleans())
def test_sse_events_are_identical_however_the_stream_is_split(cuts: list[int], crlf: bool) -> None:
    stream = LLAMACPP_STREAM.replace(b"\n", b"\r\n") if crlf else LLAMACPP_STREAM
    cuts = [cut * len(stream) // len(LLAMACPP_STREAM) for cut in cuts]
    assert list(sse_data(split_at(stream, cuts))) == LLAMACPP_EVENTS


# Event payloads: any text without CR (a line terminator in SSE); LF inside becomes several data lines.
PAYLOADS = st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r"), max_size=30), max_size=10)


def sse_stream(payloads: list[str], newline: bytes, comments: bool) -> bytes:
    stream = b""
    for payload in payloads:
        if comments:
            stream += b": ping" + newline + newline
        lines = [b"data: " + line.encode() for line in payload.split("\n")]
        stream += newline.join(lines) + newline + newline
    return stream


@given(payloads=PAYLOADS, cut_fractions=st.lists(st.floats(min_value=0, max_value=1), max_size=30),
       newline=st.sampled_from([b"\n", b"\r\n"]), comments=st.booleans())
def test_sse_random_payloads_survive_random_splits(payloads: list[str], cut_fractions: list[float],
                                                   newline: bytes, comments: bool) -> None:
    stream = sse_stream(payloads, newline, comments)
    chunks = split_at(stream, [int(fraction * len(stream)) for fraction in cut_fractions])
    assert b"".join(chunks) == stream
    assert list(sse_data(chunks)) == payloads


# ----- ndjson ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("record", "line"),
    [
        ({"model": "m:latest", "done": False, "message": {"role": "assistant", "content": "Hi"}},
         b'{"model":"m:latest","done":false,"message":{"role":"assistant","content":"Hi"}}\n'),
        ({"a": [1, 2.5, None, True]}, b'{"a":[1,2.5,null,true]}\n'),
        ({"response": "line\nbreak"}, b'{"response":"line\\nbreak"}\n'),
        ({"error": "boom"}, b'{"error":"boom"}\n'),
    ],
)
def test_ndjson_is_compact_json_and_one_newline(record: dict[str, Any], line: bytes) -> None:
    assert ndjson(record) == line


def test_ndjson_keeps_non_ascii_as_utf8() -> None:
    line = ndjson({"response": "héllo 世界 🙂"})
    assert line == '{"response":"héllo 世界 🙂"}\n'.encode()
    assert b"\\u" not in line


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=12)


@given(record=JSON)
def test_ndjson_any_record_is_one_line_that_parses_back(record: Any) -> None:
    line = ndjson(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert b"\r" not in line
    assert json.loads(line.decode("utf-8")) == record


# ----- relay -----------------------------------------------------------------------------------------

class Upstream:
    """Records how relay() treats the upstream: closes and lease releases."""

    def __init__(self) -> None:
        self.closes = 0
        self.releases = 0
        self.errors: list[ProxyError] = []

    def close(self) -> None:
        self.closes += 1

    def release(self) -> None:
        self.releases += 1

    def error_event(self, error: ProxyError) -> bytes:
        self.errors.append(error)
        return sse_error_event(error)


def test_relay_yields_every_chunk_then_closes_and_releases() -> None:
    upstream = Upstream()
    chunks = [b"data: a\n\n", b"data: b\n\n", b"data: [DONE]\n\n"]
    stream = relay(iter(chunks), upstream.close, upstream, upstream.error_event)
    assert (upstream.closes, upstream.releases) == (0, 0)   # nothing happens before the first read
    assert list(stream) == chunks
    assert (upstream.closes, upstream.releases) == (1, 1)
    assert upstream.errors == []


def test_relay_holds_the_lease_while_the_stream_is_open() -> None:
    upstream = Upstream()
    stream = iter(relay(iter([b"1", b"2"]), upstream.close, upstream, upstream.error_event))
    assert next(stream) == b"1"
    assert (upstream.closes, upstream.releases) == (0, 0)
    assert next(stream) == b"2"
    assert (upstream.closes, upstream.releases) == (0, 0)
    with pytest.raises(StopIteration):
        next(stream)
    assert (upstream.closes, upstream.releases) == (1, 1)


@pytest.mark.parametrize("error", [BackendFailed("tiny: the backend broke off its answer"),
                                   BackendTimeout("tiny: the backend sent nothing for 60s")])
def test_relay_ends_with_the_error_event_when_the_backend_breaks_off(error: ProxyError) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"data: a\n\n"
        raise error

    upstream = Upstream()
    out = list(relay(chunks(), upstream.close, upstream, upstream.error_event))
    assert out[0] == b"data: a\n\n"
    assert out[1] == sse_error_event(error)
    assert len(out) == 2
    assert json.loads(out[1].removeprefix(b"data: "))["error"]["message"] == error.message
    assert upstream.errors == [error]
    assert (upstream.closes, upstream.releases) == (1, 1)


def test_relay_error_before_the_first_chunk_is_still_an_event() -> None:
    def chunks() -> Iterator[bytes]:
        raise BackendFailed("tiny: cannot reach backend")
        yield b""  # a generator

    upstream = Upstream()
    out = list(relay(chunks(), upstream.close, upstream, lambda exc: b"E:" + exc.message.encode()))
    assert out == [b"E:tiny: cannot reach backend"]
    assert (upstream.closes, upstream.releases) == (1, 1)


def test_relay_lets_other_exceptions_through_but_still_closes_and_releases() -> None:
    def chunks() -> Iterator[bytes]:
        yield b"x"
        raise RuntimeError("bug")

    upstream = Upstream()
    stream = iter(relay(chunks(), upstream.close, upstream, upstream.error_event))
    assert next(stream) == b"x"
    with pytest.raises(RuntimeError, match="bug"):
        next(stream)
    assert (upstream.closes, upstream.releases) == (1, 1)
    assert upstream.errors == []


def test_relay_closes_and_releases_when_the_consumer_stops_early() -> None:
    source_closed: list[bool] = []

    def chunks() -> Iterator[bytes]:
        try:
            while True:
                yield b"token"
        finally:
            source_closed.append(True)

    upstream = Upstream()
    body = relay(chunks(), upstream.close, upstream, upstream.error_event)
    stream = iter(body)
    assert [next(stream) for _ in range(3)] == [b"token"] * 3
    body.close()                                     # what waitress does when the client disconnects
    assert (upstream.closes, upstream.releases) == (1, 1)
    assert source_closed == [True]
    assert list(stream) == []
    stream.close()                                   # closing twice changes nothing
    assert (upstream.closes, upstream.releases) == (1, 1)


def test_relay_of_an_empty_upstream_still_closes_and_releases() -> None:
    upstream = Upstream()
    assert list(relay(iter([]), upstream.close, upstream, upstream.error_event)) == []
    assert (upstream.closes, upstream.releases) == (1, 1)


# ----- replacing -------------------------------------------------------------------------------------

RENAME = [(b'"model":"Qwen3-32B-exl3"', b'"model":"qwen3"'), (b'"model": "Qwen3-32B-exl3"', b'"model": "qwen3"')]


def test_replacing_renames_the_model_in_every_chunk() -> None:
    chunks = [b'data: {"id":"1","model":"Qwen3-32B-exl3","choices":[]}\n\n',
              b'data: {"id": "2", "model": "Qwen3-32B-exl3", "choices": []}\n\n',
              b"data: [DONE]\n\n"]
    assert list(replacing(iter(chunks), RENAME)) == [
        b'data: {"id":"1","model":"qwen3","choices":[]}\n\n',
        b'data: {"id": "2", "model": "qwen3", "choices": []}\n\n',
        b"data: [DONE]\n\n",
    ]


def test_replacing_renames_every_occurrence_and_leaves_other_text_alone() -> None:
    chunk = (b'data: {"model":"Qwen3-32B-exl3"}\n\ndata: {"model":"Qwen3-32B-exl3",'
             b'"choices":[{"delta":{"content":"Qwen3-32B-exl3 is my name"}}]}\n\n')
    (out,) = replacing(iter([chunk]), RENAME)
    assert out.count(b'"model":"qwen3"') == 2
    assert b'"content":"Qwen3-32B-exl3 is my name"' in out


def test_replacing_with_no_replacements_keeps_the_bytes_and_emits_whole_lines() -> None:
    chunks = [b"data: a", b"b\n\n", b"data: c\n\n"]
    assert list(replacing(iter(chunks), [])) == [b"data: ab\n\n", b"data: c\n\n"]


def test_replacing_renames_a_model_field_split_across_chunks() -> None:
    # iter_content(chunk_size=None) yields whatever the socket delivered, so a field may be cut anywhere.
    stream = b'data: {"id":"1","model":"Qwen3-32B-exl3","choices":[]}\n\n'
    cut = stream.index(b"32B")
    assert b"".join(replacing(iter([stream[:cut], stream[cut:]]), RENAME)) == \
        b'data: {"id":"1","model":"qwen3","choices":[]}\n\n'


# ----- ChunkedDecoder ---------------------------------------------------------------------------------

def chunked(*payloads: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads if p) + b"0\r\n" + trailer + b"\r\n"


@given(payloads=st.lists(st.binary(min_size=1, max_size=40), max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=10))
def test_chunked_decoder_gives_the_payload_however_the_bytes_are_split(payloads: list[bytes], cuts: list[int]) -> None:
    wire = chunked(*payloads)
    points = sorted({min(cut, len(wire)) for cut in cuts})
    pieces = [wire[start:end] for start, end in zip([0, *points], [*points, len(wire)])]
    decoder = ChunkedDecoder()
    out = b"".join(decoder.feed(piece) for piece in pieces)
    assert out == b"".join(payloads)
    assert decoder.done


def test_chunked_decoder_returns_a_lone_chunk_at_once_and_a_burst_in_one_piece() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"5\r\nhello\r\n") == b"hello"  # nothing held back waiting for more
    assert decoder.feed(b"1\r\na\r\n1\r\nb\r\n2\r\ncd\r\n") == b"abcd"
    assert not decoder.done
    assert decoder.feed(b"0\r\nX-Trailer: 1\r\n\r\n") == b"" and decoder.done


def test_chunked_decoder_accepts_extensions_and_refuses_bad_framing() -> None:
    assert ChunkedDecoder().feed(b"3;name=value\r\nabc\r\n0\r\n\r\n") == b"abc"
    with pytest.raises(ValueError):
        ChunkedDecoder().feed(b"zz\r\nabc\r\n")
    with pytest.raises(ValueError):
        ChunkedDecoder().feed(b"3\r\nabcXY")
    with pytest.raises(ValueError):
        ChunkedDecoder().feed(b"1" * 5000)


def test_relay_releases_even_when_closed_before_the_first_byte() -> None:
    upstream = Upstream()
    body = relay(iter([b"never read"]), upstream.close, upstream, upstream.error_event)
    body.close()  # a generator's finally would not run here: it never started
    body.close()
    assert (upstream.closes, upstream.releases) == (1, 1)


def _cpu_seconds(run: Callable[[int], object], size: int) -> float:
    started = time.process_time()
    run(size)
    return time.process_time() - started


@pytest.mark.parametrize("transform", ["sse_data", "replacing"])
def test_a_long_line_in_many_pieces_costs_linear_time(transform: str) -> None:
    # 16 MiB without a newline once cost 19 CPU-s on /api/chat: every piece re-copied the buffer.
    piece = b"x" * 4096

    def run(size: int) -> object:
        chunks = iter([b"data: "] + [piece] * (size // len(piece)) + [b"\n\n"])
        if transform == "sse_data":
            return list(sse_data(chunks))
        return list(replacing(chunks, [(b'"model":"a"', b'"model":"b"')]))

    small, large = (min(_cpu_seconds(run, size) for _ in range(3)) for size in (2 << 20, 8 << 20))
    assert large < 8 * max(small, 0.002), (small, large)  # linear: about 4x; quadratic: about 16x


def test_a_long_line_passes_unreplaced_beyond_the_hold_limit() -> None:
    # An endless line is not held whole in memory: beyond REPLACE_HOLD_MAX it leaves as it is.
    pieces = [b"y" * 65536] * 40  # 2.5 MiB, no newline
    out = list(replacing(iter(pieces), [(b"y", b"z")]))
    assert b"".join(out).count(b"y") + b"".join(out).count(b"z") == 40 * 65536
    assert len(out) > 1  # some left before the stream ended
