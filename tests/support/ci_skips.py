"""Under CI=true a skipped test fails, unless its skip reason is listed in the
README's "Skips CI allows" table (with why): CI must never pass by skipping.

Loaded by tests/conftest.py (`pytest_plugins`); `.ci/run` sets CI=true.
"""

from __future__ import annotations

import os
import re
from typing import Any, Generator, Optional

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "README.md")
SECTION = "### Skips CI allows"
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|")


def allowed_skip_reasons(readme: str = README) -> set[str]:
    """The first column of the README table under SECTION."""
    reasons: set[str] = set()
    try:
        with open(readme, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return reasons
    inside = False
    for line in lines:
        if line.startswith("#"):
            inside = line.strip() == SECTION
            continue
        match = ROW.match(line) if inside else None
        if match:
            reasons.add(match.group(1))
    return reasons


def skip_reason(report: pytest.TestReport) -> str:
    longrepr: Any = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return str(text).removeprefix("Skipped: ")


def ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    outcome = yield
    report: Optional[pytest.TestReport] = outcome.get_result()
    if report is None or not ci() or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if reason in allowed_skip_reasons():
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true: {reason!r} is not in README.md's "
                       f"'{SECTION.lstrip('# ')}' table, so this skip fails CI")
