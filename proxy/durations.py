"""Ollama's keep_alive semantics: numbers are seconds, strings are Go-style durations.

Only parsing lives here; where the value came from is the caller's business.
"""

from __future__ import annotations

import math
import re

from proxy.errors import BadRequest

_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"  # ASCII digits only, as Go's parser
_PART = re.compile(rf"({_NUMBER})(ns|us|µs|μs|ms|s|m|h)")
_DURATION = re.compile(rf"([-+]?)((?:{_NUMBER}(?:ns|us|µs|μs|ms|s|m|h))+)")


def parse_keep_alive(value: object, *, field: str = "keep_alive") -> float:
    """Return an Ollama keep_alive as seconds; math.inf means never unload.

    Accepts seconds as a number (fractions allowed) or a Go duration string ("30s", "5m",
    "1h30m", "-1s"); as in Go, a string needs a unit unless it is "0".
    Negative means forever and 0 means unload once the last lease ends.
    Raises BadRequest for any other type or an unparseable string.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadRequest(
            f"{field}: expected seconds or a duration like \"5m\", got {type(value).__name__} {value!r}",
            param=field,
        )
    if isinstance(value, str):
        seconds = _seconds_from_string(value.strip(), field)
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond float range: longer than forever is forever
            return math.inf
        if math.isnan(seconds):
            raise BadRequest(f"{field}: expected seconds or a duration like \"5m\", got NaN", param=field)
    return math.inf if seconds < 0 else seconds


def _seconds_from_string(text: str, field: str) -> float:
    if text in ("0", "-0", "+0"):  # Go's time.ParseDuration special case
        return 0.0
    match = _DURATION.fullmatch(text)
    if match is None:
        raise BadRequest(
            f"{field}: expected seconds or a duration like \"30s\", \"5m\" or \"1h30m\", got {text!r}",
            param=field,
        )
    sign, body = match.groups()
    total = sum(float(number) * _UNIT_S[unit] for number, unit in _PART.findall(body))
    return -total if sign == "-" else total
