"""The one place settings become a running pipeline, for `watch` and the daemon alike.

    sources = start_sources(settings, host, say)       # sensor + node watcher
    stages = explain_stages_for(settings, host)         # enrichment + verdict, or none
    pipeline = build_pipeline(settings, sources, stages, sinks, on_stage_error)
    summary = pipeline.run(stop)
    sources.close()

`watch` turns its flags into a `Config` (`tracer.config`) and chooses a console
sink; the daemon keeps the sources and stages across reloads when their part of
the configuration did not change, and chooses the journal, socket and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from tracer.config import Config
from tracer.enrichment.container_tracker import shared_tracker
from tracer.enrichment.start_follower import shared_follower
from tracer.event import Event
from tracer.host import HostPaths
from tracer.pipeline import Pipeline, Sensor, Sink, Stage
from tracer.rate_limit import configured
from tracer.errors import EnvironmentProblem
from tracer.sensors.bpf_sensor import BpfConfig, BpfSensor
from tracer.sensors.choose import start_sensor
from tracer.verdict.stage import explain_stages


def bpf_config(cfg: Config) -> BpfConfig:
    """The sensor section as the BPF sensor takes it (validated by config.load)."""
    s = cfg.sensor
    return BpfConfig(errnos=cfg.errno_numbers(), extra_prefixes=tuple(s.extra_prefixes),
                     extra_devs=cfg.device_pairs(), hook=s.hook, transport=s.transport,
                     aggregate_interval_s=s.aggregate_interval_s, aggregate_max=s.aggregate_max,
                     ringbuf_pages=s.ringbuf_pages,
                     sweep_interval_s=s.sweep_interval_s, tracefs=s.tracefs, btf_path=s.btf)


@dataclass
class Sources:
    """The started sensor (`how` says which, for the user), side sources
    drained into the same queue (the GPU node lifecycle watcher), and probes that
    only feed enrichment's history (the access-change probes)."""

    sensor: Sensor
    how: str
    side: list[Sensor] = field(default_factory=list)
    background: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for source in self.side + self.background:
            source.close()
        self.side, self.background = [], []
        self.sensor.close()


def start_sources(cfg: Config, host: HostPaths, say: Callable[[str], None]) -> Sources:
    config = bpf_config(cfg)
    # the one container snapshot store of this host tree: the enrichment reads it
    # (explain_stages) and the sensor resolves a gone container's aliases with it
    # ...and the kernel's container-start signals go to its follower (start_follower.py)
    follower = shared_follower(host)
    sensor, how = start_sensor(cfg.sensor.kind, config, say, shared_tracker(host).store,
                               on_container_start=follower.on_start)
    follower.tracker.submit(follower.watch_running_engines)
    sources = Sources(sensor, how)
    if cfg.sensor.watch_changes and isinstance(sensor, BpfSensor):
        changes = start_change_probes(config, host, say)
        if changes is not None:
            sources.background.append(changes)
    if cfg.sensor.watch_nodes:
        from tracer.sensors.node_watch import NodeWatcher

        try:
            watcher = NodeWatcher(host, extra_prefixes=config.extra_prefixes,
                                  extra_majors=tuple(m for m, _ in config.extra_devs))
            watcher.start()
        except BaseException:
            sources.close()
            raise
        sources.side.append(watcher)
    return sources


def start_change_probes(config: BpfConfig, host: HostPaths,
                        say: Callable[[str], None]) -> Optional[Any]:
    """The access-change probes, feeding the container tracker's history; a probe that
    cannot load costs the story of who changed access, not the denials: said, not fatal."""
    from tracer.sensors.access_change_sensor import AccessChangeSensor, ChangeProbeConfig

    history = shared_tracker(host).history
    probe = AccessChangeSensor(history.on_record,
                               ChangeProbeConfig(headers_cache=config.headers_cache,
                                                 btf_path=config.btf_path), host, say)
    history.programs.forget = probe.forget_program
    try:
        return probe.start()
    except EnvironmentProblem as exc:
        probe.close()
        say(f"access-change probes unavailable ({exc}); verdicts cannot name who changed "
            "device rules or groups")
        return None


@dataclass
class Stages:
    """What runs on each denial: `on_arrival` on the sensor thread (snapshot a new
    container at once), then `stages` in order on the consuming thread."""

    stages: list[Stage] = field(default_factory=list)
    on_arrival: Optional[Stage] = None


def explain_stages_for(cfg: Config, host: HostPaths) -> Stages:
    if not cfg.pipeline.explain:
        return Stages()
    on_arrival, stage = explain_stages(host, cfg.pipeline.cache_size)
    return Stages([stage], on_arrival)


def build_pipeline(cfg: Config, sources: Sources, stages: Stages, sinks: list[Sink],
                   on_stage_error: Callable[[Event, Exception], None]) -> Pipeline:
    p = cfg.pipeline
    return Pipeline(sensor=sources.sensor, stages=stages.stages, sinks=sinks,
                    on_stage_error=on_stage_error, queue_size=p.queue_size,
                    on_arrival=stages.on_arrival, side_sources=sources.side,
                    rate_limiter=configured(p.rate_limit_per_cgroup, p.rate_limit_burst))
