"""Start the sensor the user asked for; `auto` falls back from BPF to audit."""

from __future__ import annotations

import errno as errno_mod
from typing import TYPE_CHECKING, Callable, Optional

from tracer.errors import EnvironmentProblem
from tracer.pipeline import Sensor
from tracer.sensors.audit_pipeline import AuditConfig
from tracer.sensors.audit_sensor import AuditSensor
from tracer.sensors.bpf_sensor import BpfConfig, BpfSensor
from tracer.sensors.container_starts import ContainerStart

if TYPE_CHECKING:
    from tracer.enrichment.container_store import SnapshotStore


def start_sensor(name: str, bpf_config: BpfConfig, say: Callable[[str], None],
                 snapshots: "Optional[SnapshotStore]" = None,
                 on_container_start: "Optional[Callable[[ContainerStart], None]]" = None
                 ) -> tuple[Sensor, str]:
    """(started sensor, how it runs, for the user).  `say` gets one-line notices;
    `snapshots` is the container tracker's store (the BPF sensor resolves a gone
    container's path aliases through it); `on_container_start` gets the BPF
    sensor's container-start signals (the container tracker's follower)."""
    if name in ("auto", "bpf"):
        bpf = BpfSensor(bpf_config, say=say, snapshots=snapshots,
                        on_container_start=on_container_start)
        try:
            bpf.start()
            return bpf, f"bpf {bpf.hook}, {bpf.transport}"
        except EnvironmentProblem as exc:
            bpf.close()
            if name == "bpf":
                raise
            say(f"BPF sensor unavailable ({exc}); falling back to Linux audit")
    if set(bpf_config.errnos) - {errno_mod.EACCES, errno_mod.EPERM}:
        say("the audit sensor reports EACCES and EPERM only")
    audit = AuditSensor(AuditConfig(extra_prefixes=bpf_config.extra_prefixes))
    audit.start()
    return audit, "audit"
