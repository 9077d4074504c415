"""One BPF_CGROUP_DEVICE program as the kernel holds it: the one model of it.

Below every stage: the BPF sensor builds these from what the probe read in the
kernel (tracer/sensors/kernel_device_programs.py), enrichment from bpf() (the
root-only way, tracer/enrichment/device_cgroup_v2.py), and the device rules run
them (tracer/enrichment/device_rules.py).  `to_json` is the fact's wire shape.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceProgram:
    """One BPF_CGROUP_DEVICE program as the kernel holds it (xlated)."""

    id: int
    name: str
    tag: str
    insns: bytes

    def label(self) -> str:
        return f"program id {self.id} '{self.name or '(no name)'}' tag {self.tag}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "tag": self.tag,
                "insns_b64": base64.b64encode(self.insns).decode("ascii")}

    @classmethod
    def from_json(cls, d: Any) -> "DeviceProgram":
        if not isinstance(d, dict):
            raise ValueError("a device program must be an object")
        return cls(int(d["id"]), str(d.get("name", "")), str(d.get("tag", "")),
                   base64.b64decode(str(d.get("insns_b64", "")), validate=True))
