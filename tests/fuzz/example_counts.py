"""How many examples each hypothesis target really ran, for the closing summary.

Each target calls `ran(name)` once per example; `report()` prints the table at
the end of the module and `assert_ran()` fails a target that ran too few (a
strategy that filtered almost everything away would otherwise pass vacuously).
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from typing import Any, Callable, Iterator, Optional, TypeVar, cast

import pytest
from hypothesis import HealthCheck, settings

COUNTS: Counter[str] = Counter()
F = TypeVar("F", bound=Callable[..., Any])
SUMMARY_FILE = os.environ.get("GPUTRACE_FUZZ_COUNTS")  # optional JSON dump for CI logs


def ran(target: str) -> None:
    COUNTS[target] += 1


def assert_ran(target: str, at_least: int) -> None:
    assert COUNTS[target] >= at_least, f"{target} ran only {COUNTS[target]} examples"


def report() -> str:
    lines = [f"{n:>7}  {name}" for name, n in sorted(COUNTS.items())]
    if SUMMARY_FILE:
        with open(SUMMARY_FILE, "w", encoding="utf-8") as handle:
            json.dump(dict(COUNTS), handle, indent=1, sort_keys=True)
    return "fuzz examples per target:\n" + "\n".join(lines)


def fuzz(examples: int, at_least: Optional[int] = None) -> Callable[[F], F]:
    """Settings for one fuzz target: `examples` inputs, no per-example deadline
    (the first call may import or compile), no health check for slow strategies;
    then `assert_ran`: the target's main `ran()` name must have counted at least
    `at_least` examples (default half of `examples`), so a strategy that filters
    nearly everything away, or a body that returns before `ran()`, fails."""
    hypothesis_settings = settings(max_examples=examples, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow,
                                                          HealthCheck.data_too_large,
                                                          HealthCheck.filter_too_much])
    floor = examples // 2 if at_least is None else at_least

    def apply(test: F) -> F:
        run = hypothesis_settings(test)

        @functools.wraps(run)
        def checked(*args: Any, **kwargs: Any) -> None:
            before = Counter(COUNTS)
            run(*args, **kwargs)
            grown = {name: COUNTS[name] - before[name] for name in COUNTS
                     if COUNTS[name] > before[name]}
            assert grown, f"{test.__name__} never called ran(): nothing was fuzzed"
            main = max(grown, key=lambda name: grown[name])
            assert_ran(main, before[main] + floor)
        return cast(F, checked)
    return apply


@pytest.fixture(scope="module", autouse=True)
def print_example_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Import into a fuzz module: prints the per-target counts after it ran."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + report())
