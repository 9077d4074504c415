"""A live sensor (BPF or audit) running in a background thread, for real-kernel tests."""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from tracer.event import Event
from tracer.pipeline import Sensor
from tracer.sensors.bpf_sensor import BpfConfig, BpfSensor


class SensorHarness:
    def __init__(self, config: "BpfConfig | None" = None, sensor: "Sensor | None" = None) -> None:
        self.sensor = sensor if sensor is not None else BpfSensor(config or BpfConfig(),
                                                                  say=lambda msg: None)
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def start(self) -> "SensorHarness":
        self.sensor.start()
        self._thread = threading.Thread(target=self._run, name="sensor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for event in self.sensor.events(self._stop):
                with self._lock:
                    self.events.append(event)
        except BaseException as exc:  # surfaced by wait_for
            self.error = exc

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        self.sensor.close()

    def matching(self, pred: Callable[[Event], bool]) -> list[Event]:
        with self._lock:
            return [e for e in self.events if pred(e)]

    def for_pid(self, pid: int) -> list[Event]:
        return self.matching(lambda e: e.process.pid == pid)

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 10.0) -> list[Event]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error:
                raise self.error
            found = self.matching(pred)
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no matching event within {timeout}s")

    def total_count(self, pid: int, path: bytes) -> int:
        """Exact denials counted for (pid, path): the highest count reported."""
        counts = [e.count for e in self.for_pid(pid) if e.node.path == path]
        return max(counts, default=0)
