"""The verdict stage: event + facts -> Verdict, live or from a recorded journal.

    verdict = explain(event, enricher)      # pipeline: enrich, decide, classify
    for result in explain_records(lines):   # `gputrace explain FILE|-`
        ...
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from tracer.enrichment.enricher import Enricher
from tracer.facts import Facts
from tracer.enrichment.process import kernel_facts
from tracer.event import Event, errno_name
from tracer.verdict import reasons as R
from tracer.verdict.catalog import classify
from tracer.verdict.fixes import ranked_fixes
from tracer.verdict.model_input import ModelRun, run_model
from tracer.verdict.reasons import Evidence, Verdict

SUMMARIES = {
    R.GROUP_DROPPED_IN_USERNS:
        "{user} is in group {group} (gid {gid}) on the host, which {path} requires, but the "
        "rootless container dropped that group, so the process inside it is refused.",
    R.NOT_IN_GROUP:
        "{path} can be used only by its owner and members of group {group} (gid {gid}), and "
        "this process is not a member.",
    R.SEAT_ACL_ONLY:
        "{path} is shared with group {group} (gid {gid}) and, through an ACL, with the user at "
        "the local seat; this process is neither, so access works at the desktop but not over "
        "SSH, in a service or in a container.",
    R.GID_MISMATCH_IN_CONTAINER:
        "The image's group '{group}' has gid {container_gid}, but on the host {path} belongs to "
        "gid {gid}, so membership of the image's '{group}' does not help.",
    R.DEVICE_CGROUP:
        "The device cgroup of this process does not allow {path} ({major}:{minor}), so the "
        "kernel refused it before looking at file permissions.",
    R.NODEV_MOUNT:
        "{path} sits on a filesystem mounted with 'nodev' ({mount}), where no device node can "
        "be opened.",
    R.LSM_DENIED:
        "File permissions and the device cgroup allow {path}, but the security module {lsm} "
        "refused the access.",
    R.SECCOMP_DENIED:
        "A seccomp filter on this process refused the system call for {path}; the kernel never "
        "looked at the file's permissions or the device cgroup.",
    R.MODE_RESTRICTIVE:
        "{path} (mode {mode}, owner {uid}, group {group}) lets only its owner in, and this "
        "process is not the owner.",
    R.CAPABILITY_REQUIRED:
        "The process is root, but its root has no power over {path} (owner {uid}, group {gid}, "
        "mode {mode}): it lacks CAP_DAC_OVERRIDE or the node is not mapped into its user "
        "namespace.",
    R.NODE_MISSING: "{path} does not exist where the process looked for it.",
    R.NODE_NOT_IN_PRIVATE_DEV: "{path} exists on the host but not in the process's own /dev.",
    # told over time: the catalog tells the story from the facts (Classification.summary);
    # these stand in only where it could not
    R.DEVICE_CGROUP_REVOKED:
        "{path} ({major}:{minor}) was allowed in this container and later taken away by a "
        "re-apply of its device rules.",
    R.SESSION_PREDATES_GROUP:
        "{user} is in group {group} (gid {gid}) in /etc/group, but this process's session "
        "started without it.",
    R.GROUP_DROPPED_BY_PROCESS:
        "Group {group} (gid {gid}), which {path} requires, was granted to the container and "
        "dropped by a process in it.",
    R.ACL_MASK_WITHHOLDS: "The ACL mask of {path} withholds the access this process asks for.",
    R.DEVICE_NUMBER_MISMATCH:
        "The device cgroup allows another number than {path}'s ({major}:{minor}), so the "
        "kernel refused it.",
    R.NO_DRIVER_FOR_NODE: "No driver answers {path}'s device number ({major}:{minor}).",
    R.UNKNOWN: "gputrace could not tell why {path} was refused{unknown_why}; the facts it "
               "gathered are listed.",
}


class _Missing(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        if key == "lsm":
            return "a security module (SELinux, AppArmor or Landlock)"
        return "" if key == "unknown_why" else "?"


LAYER_REASONS = {"nodev": R.NODEV_MOUNT, "dac": R.MODE_RESTRICTIVE,
                 "device_cgroup_v1": R.DEVICE_CGROUP, "device_cgroup_v2": R.DEVICE_CGROUP}
LAYER_NAMES = {"nodev": "the nodev mount", "dac": "the file permissions",
               "device_cgroup_v1": "the device cgroup (v1 devices.list)",
               "device_cgroup_v2": "the device cgroup (v2 BPF program)"}
LAYER_OF_REASON = {R.NODEV_MOUNT: "nodev", R.DEVICE_CGROUP: "device_cgroup",
                   R.DEVICE_CGROUP_REVOKED: "device_cgroup",
                   R.SECCOMP_DENIED: "seccomp", R.LSM_DENIED: "lsm", R.NODE_MISSING: "none",
                   R.NODE_NOT_IN_PRIVATE_DEV: "none", R.NO_DRIVER_FOR_NODE: "none",
                   R.DEVICE_NUMBER_MISMATCH: "device_cgroup",
                   R.UNKNOWN: "none"}


def ladder_json(run: ModelRun) -> list[dict[str, Any]]:
    if run.decision is None:
        return []
    return [{"layer": s.layer, "refuses": s.refuses, "check": s.check, "detail": s.detail,
             **({"program": s.program} if s.program else {})} for s in run.decision.ladder]


def later_refusals(reason: str, run: ModelRun, context: dict[str, Any]) -> list[dict[str, Any]]:
    """Layers after the reason's own that are shown to refuse too, each with its fix."""
    if run.decision is None:
        return []
    own = LAYER_OF_REASON.get(reason, "dac")
    order = ["seccomp", "nodev", "dac", "device_cgroup_v2", "device_cgroup_v1", "lsm"]
    if own == "none":
        return []
    start = 0 if own == "seccomp" else next(
        (n for n, layer in enumerate(order) if layer.startswith(own)), 0)
    later = [s for s in run.decision.refusals() if s.layer in order[start:]]
    if own != "seccomp":
        later = [s for s in later if not s.layer.startswith(own)]
    out = []
    for step in later:
        layer_reason = LAYER_REASONS.get(step.layer, R.UNKNOWN)
        fixes = ranked_fixes(layer_reason, dict(context, device_layer=step.layer))
        mine = [f for f in fixes if f.applies_to == context.get("runtime")] or fixes
        out.append({"layer": step.layer, "errno": errno_name(step.errno or 0),
                    "reason": layer_reason, "detail": step.detail,
                    "fix": mine[0].to_json() if mine else None,
                    **({"program": step.program} if step.program else {})})
    return out


def then_note(item: dict[str, Any]) -> str:
    fix = item.get("fix") or {}
    also = f": also {fix['command']}" if fix.get("command") else ""
    return (f"Then {LAYER_NAMES.get(item['layer'], item['layer'])} would refuse with "
            f"{item['errno']} ({item['detail']}){also}.")


def _evidence(facts: Facts, names: list[str]) -> list[Evidence]:
    out = []
    for name in names:
        fact = facts.fact(name)
        if fact is not None:
            out.append(Evidence(name, fact.value, fact.source, fact.origin))
    return out


def explain_facts(event: Event, facts: Facts) -> Verdict:
    """The verdict for an event whose facts are already gathered (pure)."""
    run = run_model(facts, event.open_flags)
    found = classify(event.errno, facts, run)
    names = found.evidence if found.reason != R.UNKNOWN else facts.names()
    notes = list(found.notes)
    if run.missing and found.reason != R.UNKNOWN:
        notes.append(f"Not known for this event: {', '.join(run.missing)}.")
    if run.decision is not None and run.decision.unknown:
        notes.append("Not modelled: " + ", ".join(run.decision.unknown) + ".")
    then = later_refusals(found.reason, run, found.context)
    notes += [then_note(item) for item in then]
    return Verdict(
        reason=found.reason,
        summary=found.summary or SUMMARIES[found.reason].format_map(_Missing(found.context)),
        confidence=found.confidence, evidence=_evidence(facts, names),
        fixes=ranked_fixes(found.reason, found.context), notes=notes,
        check=run.decision.check if run.decision else None,
        model_detail=run.decision.detail if run.decision else "",
        then=then, ladder=ladder_json(run))


def explain(event: Event, enricher: Enricher) -> Verdict:
    """Enrich the event, explain it, and store both on it (`facts`, `verdict`)."""
    facts = enricher.enrich(event)
    verdict = explain_facts(event, facts)
    event.verdict = verdict.to_json()
    return verdict


@dataclass
class ExplainedRecord:
    line: int
    event: Optional[Event] = None
    verdict: Optional[Verdict] = None
    error: Optional[str] = None  # bounded reason when the line could not be read

    def to_json(self) -> dict[str, Any]:
        if self.event is None:
            return {"line": self.line, "error": self.error}
        return self.event.to_json()


def explain_records(lines: Iterable[str], enricher: Optional[Enricher] = None,
                    errors: Optional[Counter[str]] = None) -> Iterator[ExplainedRecord]:
    """Re-explain JSON-lines events offline.  Recorded facts are used as they are;
    events without facts are enriched with `enricher` when given (else only the
    kernel-captured facts are used).  Bad lines yield an error record and are
    counted in `errors` by reason; nothing raises."""
    errors = errors if errors is not None else Counter()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = Event.from_json(json.loads(line))
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nesting too deep
            errors["bad_json"] += 1
            yield ExplainedRecord(number, error="bad_json")
            continue
        except (KeyError, ValueError, TypeError) as err:
            reason = "missing_field" if isinstance(err, KeyError) else "bad_event"
            errors[reason] += 1
            yield ExplainedRecord(number, error=reason)
            continue
        if event.kind != "denial":
            yield ExplainedRecord(number, event=event)
            continue
        try:
            verdict = explain_facts(event, _facts_for(event, enricher))
        except (KeyError, ValueError, TypeError):
            errors["bad_facts"] += 1
            yield ExplainedRecord(number, error="bad_facts")
            continue
        event.verdict = verdict.to_json()
        yield ExplainedRecord(number, event=event, verdict=verdict)


def _facts_for(event: Event, enricher: Optional[Enricher]) -> Facts:
    if event.facts.enriched():  # recorded with its enrichment: explain what was seen then
        return event.facts
    if enricher is not None:
        return enricher.enrich(event)
    from_fields = Facts()
    kernel_facts(event.process, from_fields, event.missing)
    facts = Facts()
    facts.update(event.facts)  # the sensor's facts, beside what the event fields say
    facts.update(from_fields)
    return facts
