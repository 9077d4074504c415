"""Verdict tests again under the systemd unit's capabilities (issue 19).

Users run gputrace as systemd/gputrace.service, whose CapabilityBoundingSet= keeps
only a few capabilities; a verdict that holds only as full root does not hold.
The bounding set is parsed from the unit file (and its audit drop-in), never
written here, so it cannot drift.  Tests that take the `explainer` fixture run
twice: `root` explains in the test process (as before), `unit` runs the
production pipeline, `gputrace watch --json --standalone`, under

    setpriv --bounding-set=-all,+<exactly the unit's capabilities> --inh-caps=-all --no-new-privs

and takes each denial's event and verdict from its output.  The terminal summary
says how many ran that way and with which capabilities (CI must show them; a skip
fails CI through tests/support/ci_skips.py).

Loaded by tests/conftest.py (`pytest_plugins`).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import pytest

from tracer.event import Event
from tracer.verdict.reasons import Verdict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNIT = os.path.join(REPO, "systemd", "gputrace.service")
AUDIT_DROP_IN = os.path.join(REPO, "systemd", "gputrace.service.d", "audit.conf")
MARK = "unit_caps"


def bounding_set(*files: str) -> list[str]:
    """CapabilityBoundingSet= of the unit (and drop-ins), merged as systemd merges
    non-empty assignments; an empty assignment resets."""
    caps: list[str] = []
    for path in files or (UNIT,):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                key, sep, value = line.strip().partition("=")
                if sep and key == "CapabilityBoundingSet" and not line.startswith("#"):
                    caps = [] if not value.strip() else caps + [
                        c for c in value.split() if c not in caps]
    return caps


def setpriv_prefix(caps: list[str]) -> list[str]:
    """Root with exactly `caps`, as systemd starts the unit (NoNewPrivileges=yes)."""
    spec = ",".join(["-all"] + ["+" + c.lower().removeprefix("cap_") for c in caps])
    return ["setpriv", f"--bounding-set={spec}", "--inh-caps=-all", "--no-new-privs", "--"]


class WatchUnderUnitCaps:
    """`gputrace watch --json --standalone` under the unit's bounding set; its
    explained events, parsed back with the one Event model."""

    def __init__(self, extra_prefixes: tuple[str, ...] = (),
                 extra_devs: tuple[str, ...] = (), sensor: str = "bpf") -> None:
        # the audit sensor runs with the audit drop-in's capabilities added
        self.caps = bounding_set(UNIT, AUDIT_DROP_IN) if sensor == "audit" else bounding_set()
        argv = [os.path.join(REPO, ".venv", "bin", "python"), "-m", "tracer", "watch", "--json",
                "--standalone", "--no-nodes", "--sensor", sensor]
        if not os.path.exists(argv[0]):
            argv[0] = "python3"
        for prefix in extra_prefixes:
            argv += ["--prefix", prefix]
        for dev in extra_devs:
            argv += ["--device", dev]
        self.argv = setpriv_prefix(self.caps) + argv
        self.events: list[Event] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        self.proc: Optional[subprocess.Popen[str]] = None

    def start(self, timeout: float = 180) -> "WatchUnderUnitCaps":
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read_out, daemon=True).start()
        ready = threading.Event()
        threading.Thread(target=self._read_err, args=(ready,), daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.close()
            raise AssertionError("gputrace watch under the unit's capabilities did not start: "
                                 + "".join(self.stderr)[-2000:])
        status = open(f"/proc/{self.proc.pid}/status", encoding="ascii").read()
        self.cap_eff = int(next(line for line in status.splitlines()
                                if line.startswith("CapEff:")).split()[1], 16)
        return self

    def _read_out(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                event = Event.from_json(json.loads(line))
                with self._lock:
                    self.events.append(event)

    def _read_err(self, ready: threading.Event) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            if "watching" in line:
                ready.set()
        ready.set()

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 15) -> list[Event]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [e for e in self.events if pred(e)]
            if found:
                return found
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError("gputrace watch exited: " + "".join(self.stderr)[-2000:])
            time.sleep(0.05)
        raise AssertionError(f"no matching event within {timeout}s under the unit's "
                             f"capabilities; stderr: {''.join(self.stderr)[-1000:]}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def verdict_of(event: Event) -> Verdict:
    assert event.verdict is not None, "the event was not explained"
    return Verdict.from_json(event.verdict)


class Explainer:
    """One denial, caught and explained either in this process as root (`root`) or
    by `gputrace watch` under the unit's capabilities (`unit`)."""

    def __init__(self, mode: str, harness: Any = None,
                 watch: Optional[WatchUnderUnitCaps] = None) -> None:
        self.mode, self.harness, self.watch = mode, harness, watch

    def explain(self, pred: Callable[[Event], bool], in_process: Callable[[Event], Verdict],
                timeout: float = 15) -> tuple[Event, Verdict]:
        """`in_process` explains a root-mode event as the module always did."""
        if self.mode == "unit":
            assert self.watch is not None
            event = self.watch.wait_for(lambda e: e.kind == "denial" and pred(e), timeout)[0]
            return event, verdict_of(event)
        event = self.harness.wait_for(lambda e: e.kind == "denial" and pred(e), timeout)[0]
        return event, in_process(event)


def explainer_fixture(extra_prefixes: tuple[str, ...] = (),
                      extra_devs: tuple[str, ...] = (), sensor: str = "bpf") -> Any:
    """A module's `explainer` fixture: each test that takes it runs as root and under
    the unit's capabilities (for `sensor="audit"`, with the audit drop-in's too; the
    root-mode audit sensor lives only while the root-mode tests run, so that two
    audit consumers never compete for gputrace's rules)."""

    @pytest.fixture(scope="module", params=["root", "unit"])
    def explainer(request: pytest.FixtureRequest) -> Iterator[Explainer]:
        if request.param == "root" and sensor == "bpf":
            yield Explainer("root", harness=request.getfixturevalue("bpf_sensor"))
            return
        if request.param == "root":
            from tests.support.sensor_harness import SensorHarness
            from tracer.sensors.audit_pipeline import AuditConfig
            from tracer.sensors.audit_sensor import AuditSensor
            harness = SensorHarness(sensor=AuditSensor(AuditConfig(
                extra_prefixes=extra_prefixes))).start()
            try:
                yield Explainer("root", harness=harness)
            finally:
                harness.close()
            return
        watch = WatchUnderUnitCaps(extra_prefixes, extra_devs, sensor).start()
        try:
            yield Explainer("unit", watch=watch)
        finally:
            watch.close()
    return explainer


# -- pytest plugin: mark and count ------------------------------------------------
_outcomes: Counter[str] = Counter()
_failed: list[str] = []
_audit_ran: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARK}: runs gputrace under the systemd unit's "
                            "capability bounding set (tests/support/unit_caps.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is not None and spec.params.get("explainer") == "unit":
            item.add_marker(MARK)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if MARK not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _outcomes["xfailed" if hasattr(report, "wasxfail") else report.outcome] += 1
        if "audit" in report.nodeid:
            _audit_ran.append(report.nodeid)
        if report.failed:
            _failed.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _outcomes:
        return
    counts = ", ".join(f"{n} {what}" for what, n in sorted(_outcomes.items()))
    terminalreporter.write_sep("-", "under the systemd unit's capabilities")
    terminalreporter.write_line(
        f"{sum(_outcomes.values())} verdict tests ran gputrace with CapabilityBoundingSet="
        f"{' '.join(bounding_set())} (parsed from systemd/gputrace.service): {counts}")
    if _audit_ran:
        extra = sorted(set(bounding_set(UNIT, AUDIT_DROP_IN)) - set(bounding_set()))
        terminalreporter.write_line(
            f"  {len(_audit_ran)} of them with the audit sensor, plus the audit drop-in's "
            f"{' '.join(extra)}")
    for nodeid in _failed:
        terminalreporter.write_line(f"  failed under the unit's capabilities: {nodeid}")
