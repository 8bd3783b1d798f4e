"""Sizes as config files write them, and footprints placed on devices (proxy/memory.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.memory import Need, devices_of, format_placement, format_size, parse_size

GiB = 1024 ** 3


@pytest.mark.parametrize(("text", "expected"), [
    ("23.5GiB", int(23.5 * GiB)), ("512MiB", 512 * 1024 ** 2), ("24GB", 24 * 1000 ** 3), ("1 gib", GiB),
    ("2TiB", 2 * 1024 ** 4), ("1000", 1000), (4096, 4096), ("0", 0), (".5GiB", GiB // 2),
])
def test_sizes_in_binary_and_decimal_units(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GiB", "24 bananas", "GiB", "", True, None, -5, [1]])
def test_a_bad_size_names_the_value(text: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


@given(st.integers(min_value=0, max_value=2 ** 50))
def test_format_size_reads_back_within_its_rounding(size: int) -> None:
    shown = format_size(size).replace(" ", "")
    assert abs(parse_size(shown) - size) <= max(1, size // 20)


def test_a_need_placed_on_gpus() -> None:
    assert Need(vram=10 * GiB, ram=GiB).on((1,)) == {"gpu1": 10 * GiB, "ram": GiB}
    assert Need(vram=3, gpus=(0, 1)).on((0, 1)) == {"gpu0": 2, "gpu1": 1}  # an even split, the rest on the first
    assert Need(vram=30, gpus=(2, 0), split=(10, 20)).on((2, 0)) == {"gpu2": 10, "gpu0": 20}
    assert Need(vram=10 * GiB).on(()) == {}  # no GPU budget: VRAM is not placed
    assert devices_of({"gpu2": 1, "ram": 5, "gpu0": 1}) == (0, 2)
    assert format_placement({"gpu1": 20 * GiB, "ram": int(1.5 * GiB)}) == "20 GiB on gpu1, 1.5 GiB on ram"
