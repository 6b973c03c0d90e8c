"""The host-side integer helpers agree with Triton's constexpr functions they replace in hot paths."""

import pytest

from hf_paged._intmath import cdiv, next_power_of_2


def test_next_power_of_2_matches_triton():
    triton = pytest.importorskip("triton")
    for n in range(0, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_matches_triton():
    triton = pytest.importorskip("triton")
    for a in range(0, 300):
        for b in (1, 2, 3, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
