"""What the catalog says when a layer that could have refused is not known.

No unknown layer counts as allowing when a cause is chosen by elimination (seccomp
for EPERM, a security module for EACCES): the verdict is `unknown` and names the
layer and why it is not known.  For an EPERM on a node removed since (no inode, so
no decision), the device cgroup layers are still evaluated: they need only the
device number.
"""

from __future__ import annotations

from tracer.facts import Facts
from tracer.verdict.access_model import AccessDecision, device_layers
from tracer.verdict.model_input import ModelRun, device_policy_from_facts

LAYER_TITLES = {"nodev": "the nodev layer (mount flags)", "dac": "the file permissions",
                "device_cgroup": "the device cgroup", "device_cgroup_v1": "the v1 device cgroup",
                "device_cgroup_v2": "the v2 device cgroup (BPF programs)"}


def unknown_layer_notes(decision: AccessDecision, err: int, missing: list[str],
                        also: list[str]) -> tuple[list[str], str]:
    """(notes, the summary's "unknown why") for the layers giving `err` not known."""
    layers = decision.not_known(err)
    notes = [f"Not known: {LAYER_TITLES.get(s.layer, s.layer)} ({s.detail})." for s in layers]
    notes += also
    if missing:
        notes.append(f"Missing facts: {', '.join(missing)}.")
    why = (" (" + ", ".join(LAYER_TITLES.get(s.layer, s.layer) for s in layers)
           + " could not be evaluated)") if layers else ""
    return notes, why


def eperm_layers(facts: Facts, run: ModelRun) -> AccessDecision:
    """The decision's layers for an EPERM; without the node's inode (removed since), the
    device layers alone, which need only its device number."""
    if run.decision is not None:
        return run.decision
    major, minor = facts.get("node.major"), facts.get("node.minor")
    ladder = device_layers(device_policy_from_facts(facts),
                           "b" if facts.get("node.type") == "block" else "c",
                           None if major is None else int(major),
                           None if minor is None else int(minor), run.mask)
    return AccessDecision(None, None, "device_cgroup", "", (), tuple(ladder))
