"""Under CI=true a skip fails the run unless README.md names its reason
(tests/support/ci_skips.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.ci_skips import allowed_skip_reasons

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED = "host has no cgroup v1 devices hierarchy"
TESTS = f'''
import pytest

def test_ran():
    pass

@pytest.mark.skipif(True, reason={ALLOWED!r})
def test_allowed_skip():
    pass

def test_unnamed_skip():
    pytest.skip("needs a GPU")
'''


def run(tmp_path, ci: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    (tmp_path / "test_sample.py").write_text(TESTS)
    env = dict(os.environ, CI=ci)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.support.ci_skips",
                           "-p", "no:cacheprovider", "-q", "-rA", str(tmp_path / "test_sample.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_readme_names_the_allowed_skips() -> None:
    assert ALLOWED in allowed_skip_reasons()


def test_an_unnamed_skip_fails_under_ci(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = run(tmp_path, "true")
    assert done.returncode == 1, done.stdout
    assert "1 failed, 1 passed, 1 skipped" in done.stdout, done.stdout
    assert "FAILED" in done.stdout and "needs a GPU" in done.stdout


def test_skips_stay_skips_outside_ci(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = run(tmp_path, "")
    assert done.returncode == 0, done.stdout
    assert "1 passed, 2 skipped" in done.stdout, done.stdout
