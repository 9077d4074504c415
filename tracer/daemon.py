"""`gputrace daemon`: the watch pipeline, kept running, with durable and shared outputs.

    sensor -> [enrich + verdict] -> journal, subscription socket, metrics

One daemon per host: a flock on ``<runtime_dir>/daemon.lock`` refuses a second.
SIGHUP re-reads the configuration and rebuilds what changed (a bad file keeps
the running configuration and says why); SIGTERM/SIGINT stop the sensor, drain
what the kernel still holds with final counts, flush the journal, let
subscribers read what was queued, and exit 0.  Cheap checks (lock, metrics
port, socket, journal directory) run before the BPF program is compiled.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

from tracer import config as config_mod
from tracer.config import Config
from tracer.errors import ExitStatus, GputraceError
from tracer.event import Event
from tracer.host import HostPaths
from tracer.assembly import Sources, Stages, build_pipeline, explain_stages_for, start_sources
from tracer.enrichment.container_tracker import shared_tracker
from tracer.enrichment.start_follower import shared_follower
from tracer.pipeline import Pipeline, Sensor, Sink, Summary
from tracer.sensors.bpf_sensor import BpfSensor
from tracer.sinks.journal import JournalSink
from tracer.sinks.metrics import DaemonState, MetricsSink, Probe
from tracer.sinks.subscription import SubscriptionSink


def say(message: str) -> None:
    print(f"gputrace: {message}", file=sys.stderr, flush=True)


class AlreadyRunning(GputraceError):
    status = ExitStatus.ALREADY_RUNNING


class DaemonLock:
    """An exclusive flock held for the daemon's lifetime; the file names the holder."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(self.fd)
            raise AlreadyRunning(f"another gputrace daemon is already running (pid {holder}, "
                                 f"lock {path})") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self.fd)  # closing drops the flock; the file stays (no unlink race)







def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) when NOTIFY_SOCKET is set; a no-op otherwise."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            pass


class Daemon:
    def __init__(self, cfg: Config, config_path: Optional[str], host: Optional[HostPaths] = None,
                 say: Callable[[str], None] = say) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.host = host or cfg.host_paths()
        self.say = say
        self.state = DaemonState()
        self.metrics = MetricsSink(self.state)
        self.metrics_port: Optional[int] = None
        self.journal: Optional[JournalSink] = None
        self.socket: Optional[SubscriptionSink] = None
        self.sources: Optional[Sources] = None  # the sensor and the node lifecycle watcher
        self.stages = Stages()
        self.pipeline: Optional[Pipeline] = None
        self.discards_before: dict[str, int] = {}  # pipeline drops of runs that ended (reloads)
        self.stop = threading.Event()
        self.terminating = False
        self.reload_requested = False
        self._last_stage_log = 0.0
        self.state.sensor_stats = lambda: self.sensor.stats() if self.sensor else {}
        self.state.sensor_name = lambda: self._sensor_name()
        self.state.pipeline_discards = self._pipeline_discards
        self.state.probes = self._probes
        self.state.subscribers = lambda: self.socket.subscriber_count if self.socket else 0
        self.state.journal_lines = lambda: self.journal.lines_written if self.journal else 0
        self.state.containers = lambda: {**shared_tracker(self.host).store.stats(),
                                         **shared_follower(self.host).stats()}

    def _sensor_name(self) -> str:
        if self.sensor is None:
            return self.cfg.sensor.kind if self.cfg.sensor.kind != "auto" else "bpf"
        return "bpf" if isinstance(self.sensor, BpfSensor) else "audit"

    def _probes(self) -> list[Probe]:
        sensor, name = self.sensor, self._sensor_name()
        if isinstance(sensor, BpfSensor):
            return [Probe(name, sensor.hook, sensor.transport, sensor.bpf is not None)]
        return [Probe(name, "netlink" if sensor else "", "", sensor is not None)]

    def _pipeline_discards(self) -> dict[str, int]:
        live = getattr(self.pipeline, "dropped", None) or {}  # while a run is going
        return {reason: self.discards_before.get(reason, 0) + int(live.get(f"dropped_{reason}", 0))
                for reason in ("queue_full", "rate_limited")}

    # -- building the outputs ----------------------------------------------------
    def _open_outputs(self, old: Optional[Config]) -> None:
        cfg = self.cfg
        if old is None or old.metrics != cfg.metrics:
            self.metrics.close()
            self.metrics_port = None
            if cfg.metrics.enabled:
                self.metrics_port = self.metrics.serve(cfg.metrics.listen, cfg.metrics.port)
        if old is None or old.socket != cfg.socket or old.runtime_dir != cfg.runtime_dir:
            if self.socket:
                self.socket.close()
                self.socket = None
            if cfg.socket.enabled:
                self.socket = SubscriptionSink(
                    cfg.socket_path, cfg.socket.group, cfg.socket.subscriber_buffer,
                    on_drop=lambda n: self.state.discard("subscriber_queue_full", n), say=self.say)
        if old is None or old.journal != cfg.journal or old.state_dir != cfg.state_dir:
            if self.journal:
                self.journal.close()
                self.journal = None
            if cfg.journal.enabled:
                j = cfg.journal
                self.journal = JournalSink(
                    cfg.journal_dir, j.max_file_bytes, j.max_files, j.max_age_days,
                    j.fsync_interval_s, on_discard=lambda r: self.state.discard(f"journal_{r}"))
                self.journal.apply_retention()
        if old is None or old.pipeline != cfg.pipeline:
            self.stages = explain_stages_for(cfg, self.host)  # a new enricher cache

    @property
    def sensor(self) -> Optional[Sensor]:
        return self.sources.sensor if self.sources else None

    def _start_sensor(self, old: Optional[Config]) -> None:
        if old is not None and old.sensor == self.cfg.sensor and self.sources is not None:
            return
        if self.sources is not None:
            self.say("sensor settings changed: reloading the probe")
            self.sources.close()
            self.sources = None
        self.sources = start_sources(self.cfg, self.host, self.say)

    def sinks(self) -> list[Sink]:
        out: list[Sink] = []
        if self.journal:
            out.append(self.journal)
        if self.socket:
            out.append(self.socket)
        out.append(self.metrics)
        return out

    def _on_stage_error(self, event: Event, exc: Exception) -> None:
        self.state.discard("enrichment_failed")
        now = time.monotonic()
        if now - self._last_stage_log > 60:  # repeated errors: one line a minute
            self._last_stage_log = now
            self.say(f"could not explain a denial ({type(exc).__name__}: {exc}); "
                     "it is recorded without a verdict")

    # -- signals -----------------------------------------------------------------
    def _on_terminate(self, *_: object) -> None:
        self.terminating = True
        self.stop.set()

    def _on_hangup(self, *_: object) -> None:
        self.reload_requested = True
        self.stop.set()

    def reload(self) -> None:
        try:
            new = config_mod.load(self.config_path)
        except GputraceError as exc:
            self.say(f"reload refused, keeping the running configuration: {exc}")
            return
        old, self.cfg = self.cfg, new
        try:
            self._open_outputs(old)
            self._start_sensor(old)
        except GputraceError as exc:
            self.say(f"reload failed ({exc}); restoring the previous configuration")
            self.cfg = old
            self._open_outputs(new)
            self._start_sensor(new)
            return
        self.say(f"configuration reloaded from {self.config_path or config_mod.DEFAULT_PATH}")

    # -- running -------------------------------------------------------------------
    def run(self) -> Summary:
        lock = DaemonLock(self.cfg.lock_path)
        total = Summary()
        signal.signal(signal.SIGTERM, self._on_terminate)
        signal.signal(signal.SIGINT, self._on_terminate)
        signal.signal(signal.SIGHUP, self._on_hangup)
        try:
            self._open_outputs(None)
            self._start_sensor(None)
            self._announce()
            while True:
                assert self.sources is not None
                self.pipeline = build_pipeline(self.cfg, self.sources, self.stages, self.sinks(),
                                               self._on_stage_error)
                summary = self.pipeline.run(self.stop)
                self.pipeline = None
                for reason in ("queue_full", "rate_limited"):
                    self.discards_before[reason] = self.discards_before.get(reason, 0) + \
                        summary.sensor_stats.get(f"dropped_{reason}", 0)
                total.denials += summary.denials
                total.total += summary.total
                total.stage_errors += summary.stage_errors
                total.sensor_stats = summary.sensor_stats
                if self.terminating:
                    break
                self.stop.clear()
                if self.reload_requested:
                    self.reload_requested = False
                    sd_notify("RELOADING=1")
                    self.reload()
                    sd_notify("READY=1")
        finally:
            sd_notify("STOPPING=1")
            self._close()
            lock.release()
        self.say(f"stopped: {total.line()}")
        return total

    def _announce(self) -> None:
        parts = [f"sensor {self.sources.how if self.sources else '?'}"]
        if self.journal:
            parts.append(f"journal {self.journal.directory}")
        if self.socket:
            parts.append(f"socket {self.socket.path} ({self.socket.mode:04o})")
        if self.metrics_port is not None:
            parts.append(f"metrics http://{self.cfg.metrics.listen}:{self.metrics_port}/metrics")
        self.say("daemon ready: " + ", ".join(parts))
        sd_notify("READY=1")

    def _close(self) -> None:
        if self.sources is not None:
            self.sources.close()
            self.sources = None
        if self.journal is not None:
            self.journal.close()
        if self.socket is not None:
            self.socket.close()
        self.metrics.close()


def run_daemon(config_path: Optional[str]) -> Summary:
    cfg = config_mod.load(config_path)
    return Daemon(cfg, config_path, host=cfg.host_paths()).run()


def config_changed(old: Config, new: Config) -> list[str]:
    """Top-level sections that differ (for messages and tests)."""
    return [f.name for f in dataclasses.fields(Config) if getattr(old, f.name) != getattr(new, f.name)]
