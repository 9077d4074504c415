"""The fuzz helper fails a target that fuzzed too little (tests/fuzz/example_counts.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.example_counts import fuzz, ran


def test_a_target_that_filters_nearly_everything_away_fails() -> None:
    @fuzz(60)
    @given(st.integers(min_value=1, max_value=10**9))
    def mostly_returns_early(n: int) -> None:
        if n % 5:
            return  # the body never reaches the code under test
        ran("mostly_returns_early")

    with pytest.raises(AssertionError, match="ran only|never called"):
        mostly_returns_early()


def test_a_target_that_never_counts_fails() -> None:
    @fuzz(20)
    @given(st.integers())
    def never_counts(n: int) -> None:
        pass

    with pytest.raises(AssertionError, match="never called ran"):
        never_counts()


def test_a_target_that_runs_its_examples_passes() -> None:
    @fuzz(40)
    @given(st.integers())
    def counts(n: int) -> None:
        ran("counts")

    counts()
