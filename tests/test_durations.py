"""parse_keep_alive: Ollama's keep_alive forms (ollama-api.md section 11), table-driven and by property."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.durations import parse_keep_alive
from proxy.errors import BadRequest

# Non-negative integers that a float represents exactly, so equality with the int is meaningful.
EXACT_SECONDS = st.integers(min_value=0, max_value=2**53)
SMALL = st.integers(min_value=0, max_value=10**6)


@pytest.mark.parametrize(
    ("value", "expected_s"),
    [
        (0, 0.0),
        (0.0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        (300, 300.0),
        (-1, math.inf),
        (-0.5, math.inf),
        (-3600, math.inf),
        (math.inf, math.inf),
        (-math.inf, math.inf),
        ("0", 0.0),
        ("0s", 0.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("300ms", 0.3),
        ("1m30s", 90.0),
        ("2h0m5s", 7205.0),
        ("1500us", 0.0015),
        ("1500µs", 0.0015),
        ("1000000000ns", 1.0),
        (".5s", 0.5),
        ("+5m", 300.0),
        (" 5m ", 300.0),
        ("-1s", math.inf),
        ("-1m", math.inf),
        ("-1h30m", math.inf),
    ],
)
def test_keep_alive_accepts_numbers_and_go_durations(value: object, expected_s: float) -> None:
    assert parse_keep_alive(value) == pytest.approx(expected_s)


def test_keep_alive_returns_float_seconds_for_an_int() -> None:
    seconds = parse_keep_alive(30)
    assert isinstance(seconds, float)
    assert seconds == 30.0


def test_keep_alive_zero_is_zero_not_forever() -> None:
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive("0") == 0
    assert parse_keep_alive("-0") == 0


@pytest.mark.parametrize(
    "value",
    ["300", "", "   ", "soon", "5 m", "5d", "1e3s", "5mm", "m5", "--5m", "5m-", "1h 30m", "-1",
     True, False, None, [], {}, ["5m"], {"s": 5}, float("nan"), b"5m"],
    ids=repr,
)
def test_keep_alive_rejects_everything_else_with_bad_request(value: object) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_keep_alive(value)
    assert caught.value.status == 400
    assert caught.value.param == "keep_alive"
    assert "keep_alive" in caught.value.message


@pytest.mark.parametrize("value", ["soon", "300", True, None])
def test_keep_alive_error_names_the_field_it_came_from(value: object) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_keep_alive(value, field="options.keep_alive")
    assert caught.value.param == "options.keep_alive"
    assert caught.value.message.startswith("options.keep_alive:")


def test_keep_alive_error_quotes_the_bad_string() -> None:
    with pytest.raises(BadRequest, match="'soon'"):
        parse_keep_alive("soon")


def test_keep_alive_huge_integer_is_forever_or_bad_request_not_a_crash() -> None:
    # JSON integers have no size limit: {"keep_alive": 1000...0} reaches us as a Python int.
    try:
        seconds = parse_keep_alive(10**400)
    except BadRequest:
        return
    assert seconds == math.inf


@given(EXACT_SECONDS)
def test_keep_alive_integer_seconds_round_trip(seconds: int) -> None:
    assert parse_keep_alive(seconds) == seconds
    assert parse_keep_alive(f"{seconds}s") == seconds


@given(SMALL, SMALL, SMALL)
def test_keep_alive_hours_minutes_seconds_add_up(hours: int, minutes: int, seconds: int) -> None:
    assert parse_keep_alive(f"{hours}h{minutes}m{seconds}s") == 3600 * hours + 60 * minutes + seconds


@given(st.one_of(st.integers(min_value=-(10**18), max_value=-1), st.floats(max_value=-1e-300, allow_nan=False)))
def test_keep_alive_any_negative_number_means_forever(value: float) -> None:
    assert parse_keep_alive(value) == math.inf


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["ns", "us", "ms", "s", "m", "h"]))
def test_keep_alive_any_negative_duration_string_means_forever(amount: int, unit: str) -> None:
    assert parse_keep_alive(f"-{amount}{unit}") == math.inf


@given(st.one_of(st.text(), st.text(alphabet="0123456789.-+ hmsnuµ")))
def test_keep_alive_arbitrary_text_parses_or_is_a_bad_request(text: str) -> None:
    try:
        seconds = parse_keep_alive(text)
    except BadRequest as exc:
        assert exc.param == "keep_alive"
        return
    assert isinstance(seconds, float)
    assert seconds == math.inf or seconds >= 0
