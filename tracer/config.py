"""The daemon's YAML configuration: dataclasses with documented defaults.

Every key lives in a dataclass field whose metadata carries its documentation,
so `docs_table()` renders the reference table and `load()` rejects what the
table does not list.  All validation happens here, while the YAML line is
known, so `gputrace daemon --check-config` and the daemon accept the same files.  Errors name the file and line (from YAML node marks) and
say what is wrong in one line.  With no file at all, the defaults run.
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from tracer.errors import BadInput
from tracer.host import HostPaths
from tracer.sensors.bpf_constants import MAX_PREFIXES, PREFIX_CAP, RINGBUF_PAGES

DEFAULT_PATH = "/etc/gputrace/config.yaml"
DEFAULT_METRICS_PORT = 9464


def doc(text: str, choices: tuple[str, ...] = (), minimum: Optional[float] = None,
        power_of_two: bool = False) -> dict:
    return {"doc": text, "choices": choices, "minimum": minimum, "power_of_two": power_of_two}


@dataclass
class SensorConfig:
    kind: str = field(default="auto", metadata=doc(
        "Which sensor: auto uses BPF and falls back to Linux audit (as `gputrace watch` does); "
        "the audit sensor needs CAP_AUDIT_READ and CAP_AUDIT_CONTROL.",
        choices=("auto", "bpf", "audit")))
    errnos: list[str] = field(default_factory=lambda: ["EACCES", "EPERM"], metadata=doc(
        "Errors to record, by name (add ENOENT, ENXIO to see missing or driverless nodes)."))
    extra_prefixes: list[str] = field(default_factory=list, metadata=doc(
        f"Path prefixes watched besides the built-in GPU node prefixes (absolute, at most "
        f"{PREFIX_CAP} bytes each)."))
    extra_devices: list[str] = field(default_factory=list, metadata=doc(
        "Extra device numbers whose opens and ioctls are watched, as \"MAJOR\" or \"MAJOR:MINOR\"."))
    hook: str = field(default="auto", metadata=doc(
        "Kernel hook: auto tries fexit and falls back to the syscall exit tracepoints.",
        choices=("auto", "fexit", "tracepoint")))
    transport: str = field(default="auto", metadata=doc(
        "Kernel-to-user buffer.", choices=("auto", "ringbuf", "perf")))
    aggregate_max: int = field(default=16384, metadata=doc(
        "Size of the kernel table that folds repeats into counts; when full, repeats are "
        "sent one by one (counted: aggregation_table_full).", minimum=64))
    ringbuf_pages: int = field(default=RINGBUF_PAGES, metadata=doc(
        "Kernel ring buffer size in 4 KiB pages (a power of two); 1024 = 4 MiB holds a burst of "
        "about 5,000 distinct denials.", minimum=1, power_of_two=True))
    aggregate_interval_s: float = field(default=1.0, metadata=doc(
        "Repeats of one (process, node, errno) are folded and reported at most this often.",
        minimum=0.01))
    sweep_interval_s: float = field(default=1.0, metadata=doc(
        "How often the aggregation table is swept for final counts.", minimum=0.05))
    tracefs: str = field(default="/sys/kernel/tracing", metadata=doc("Where tracefs is mounted."))
    btf: Optional[str] = field(default=None, metadata=doc(
        "Kernel BTF file; null means /sys/kernel/btf/vmlinux."))
    watch_nodes: bool = field(default=True, metadata=doc(
        "Also record GPU nodes created, removed, or changing mode, owner or ACL (inotify on "
        "/dev) and GPU devices added or removed by drivers (kernel uevents)."))
    watch_changes: bool = field(default=True, metadata=doc(
        "With the BPF sensor, also record the calls that change access while workloads run: "
        "cgroup device programs attached, replaced or detached (bpf()) and processes changing "
        "their groups (setgroups/setgid), so a verdict can say who took access away and when."))


@dataclass
class JournalConfig:
    enabled: bool = field(default=True, metadata=doc(
        "Write every event with its verdict to the journal (JSON lines)."))
    max_file_bytes: int = field(default=16 * 1024 * 1024, metadata=doc(
        "Rotate the current journal file once it reaches this size.", minimum=4096))
    max_files: int = field(default=8, metadata=doc(
        "Rotated journal files kept besides the current one; older ones are deleted.", minimum=1))
    max_age_days: float = field(default=30.0, metadata=doc(
        "Rotated files older than this are deleted; 0 keeps them regardless of age.", minimum=0))
    fsync_interval_s: float = field(default=1.0, metadata=doc(
        "fsync the journal at most this often (each line is written at once either way, "
        "so a killed daemon loses nothing; fsync bounds loss on power failure).", minimum=0))


@dataclass
class SocketConfig:
    enabled: bool = field(default=True, metadata=doc(
        "Stream events to local subscribers (`gputrace watch` attaches here)."))
    path: str = field(default="", metadata=doc(
        "Socket path; empty means events.sock in runtime_dir."))
    group: str = field(default="gputrace", metadata=doc(
        "Group allowed to subscribe (socket mode 0660); when it does not exist the socket "
        "is root-only (0600)."))
    subscriber_buffer: int = field(default=1024, metadata=doc(
        "Events queued per subscriber; a slower subscriber loses the excess (counted).",
        minimum=1))


@dataclass
class MetricsConfig:
    enabled: bool = field(default=True, metadata=doc("Serve Prometheus metrics over HTTP."))
    listen: str = field(default="127.0.0.1", metadata=doc(
        "Address to listen on; use 0.0.0.0 only behind a firewall."))
    port: int = field(default=DEFAULT_METRICS_PORT, metadata=doc(
        "TCP port of the /metrics endpoint (0 picks a free one and logs it).", minimum=0))


@dataclass
class PipelineConfig:
    explain: bool = field(default=True, metadata=doc(
        "Enrich each denial and attach a verdict (cause and fixes)."))
    queue_size: int = field(default=10000, metadata=doc(
        "Events waiting between the sensor and enrichment; beyond it they are dropped and "
        "counted (queue_full).  Each queued event takes about 2 KiB.", minimum=10))
    rate_limit_per_cgroup: float = field(default=200.0, metadata=doc(
        "Distinct denial events per second accepted from one cgroup (container); repeats of "
        "the same denial are folded in the kernel and never limited.  Over it, events are "
        "dropped before enrichment and counted (rate_limited).  0 disables the limit.",
        minimum=0))
    rate_limit_burst: int = field(default=1000, metadata=doc(
        "Events one cgroup may send at once before its rate limit applies.", minimum=1))
    cache_size: int = field(default=256, metadata=doc(
        "Containers (user namespaces and cgroups) whose facts are cached, least recently used "
        "first out, so a process that already exited still gets its container's facts.",
        minimum=1))


@dataclass
class Config:
    state_dir: str = field(default="/var/lib/gputrace", metadata=doc(
        "Where the journal lives (systemd StateDirectory)."))
    runtime_dir: str = field(default="/run/gputrace", metadata=doc(
        "Where the lock file and the socket live (systemd RuntimeDirectory)."))
    host_root: str = field(default="/", metadata=doc(
        "Where the host's /proc, /sys, /dev, /etc and /run are; /host in a container that "
        "mounts the host's root there (see contrib/kubernetes)."))
    sensor: SensorConfig = field(default_factory=SensorConfig, metadata=doc("The BPF sensor."))
    pipeline: PipelineConfig = field(default_factory=PipelineConfig, metadata=doc(
        "Stages between the sensor and the sinks."))
    journal: JournalConfig = field(default_factory=JournalConfig, metadata=doc(
        "The crash-safe JSON-lines journal."))
    socket: SocketConfig = field(default_factory=SocketConfig, metadata=doc(
        "The local subscription socket."))
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata=doc(
        "The Prometheus endpoint."))

    @property
    def socket_path(self) -> str:
        return self.socket.path or os.path.join(self.runtime_dir, "events.sock")

    @property
    def lock_path(self) -> str:
        return os.path.join(self.runtime_dir, "daemon.lock")

    @property
    def journal_dir(self) -> str:
        return os.path.join(self.state_dir, "journal")

    def host_paths(self) -> HostPaths:
        return HostPaths() if self.host_root in ("", "/") else HostPaths.under(self.host_root)

    def errno_numbers(self) -> tuple[int, ...]:
        return tuple(getattr(errno_mod, name) for name in self.sensor.errnos)

    def device_pairs(self) -> tuple[tuple[int, Optional[int]], ...]:
        return tuple(device_pair(v) for v in self.sensor.extra_devices)


def device_pair(text: str) -> tuple[int, Optional[int]]:
    """"MAJOR" or "MAJOR:MINOR" ("MAJOR:*" = any minor); ValueError otherwise."""
    major, _, minor = text.partition(":")
    return int(major), (int(minor) if minor and minor != "*" else None)


def prefix_ok(prefix: str) -> bool:
    """A watched path prefix the BPF sensor can hold (its LPM trie key size)."""
    return prefix.startswith("/") and len(prefix.encode()) <= PREFIX_CAP


def is_errno_name(name: str) -> bool:
    return isinstance(getattr(errno_mod, name, None), int)


def with_sensor(cfg: Config, *, kind: str, errnos: tuple[str, ...], extra_prefixes: tuple[str, ...],
                extra_devices: tuple[str, ...], hook: str, transport: str, tracefs: str,
                btf: Optional[str], watch_nodes: bool, explain: bool) -> Config:
    """`cfg` with `gputrace watch`'s flags in place of its sensor section (the
    flags' own defaults included, as before) and its explain switch."""
    sensor = dataclasses.replace(
        cfg.sensor, kind=kind, errnos=list(errnos), extra_prefixes=list(extra_prefixes),
        extra_devices=list(extra_devices), hook=hook, transport=transport, tracefs=tracefs,
        btf=btf, watch_nodes=watch_nodes)
    return dataclasses.replace(cfg, sensor=sensor,
                               pipeline=dataclasses.replace(cfg.pipeline, explain=explain))


def _where(path: str, node: yaml.Node) -> str:
    return f"{path}:{node.start_mark.line + 1}"


class _Reader:
    """Walks a composed YAML tree against the dataclasses, keeping line numbers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.constructor = yaml.SafeLoader("")

    def fail(self, node: yaml.Node, reason: str) -> BadInput:
        return BadInput(f"{_where(self.path, node)}: {reason}")

    def section(self, cls: type, node: yaml.Node, name: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{name or 'the configuration'} must be a mapping of keys")
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node)
            full = f"{name}.{key}" if name else str(key)
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise self.fail(key_node, f"unknown key '{full}' (known here: {known})")
            if key in values:
                raise self.fail(key_node, f"duplicate key '{full}'")
            values[key] = self.value(hints[key], fields[key], value_node, full)
        return cls(**values)

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, "expected a single value here")
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # a tag SafeLoader will not build (!!python/object:...)
            raise self.fail(node, f"not a plain value: {getattr(exc, 'problem', None) or exc}"
                            .splitlines()[0]) from None

    def value(self, hint: Any, fld: dataclasses.Field, node: yaml.Node, full: str) -> Any:
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self.section(hint, node, full)
        optional = get_origin(hint) is Union and type(None) in get_args(hint)
        if optional:
            hint = next(a for a in get_args(hint) if a is not type(None))
        if get_origin(hint) is list:
            if not isinstance(node, yaml.SequenceNode):
                raise self.fail(node, f"'{full}' must be a list")
            if full == "sensor.extra_prefixes" and len(node.value) > MAX_PREFIXES:
                raise self.fail(node, f"'{full}' holds at most {MAX_PREFIXES} prefixes")
            return [self.check(fld, self.typed(str, n, full), n, full) for n in node.value]
        raw = self.scalar(node)
        if raw is None and optional:
            return None
        return self.check(fld, self.typed(hint, node, full), node, full)

    def typed(self, hint: type, node: yaml.Node, full: str) -> Any:
        raw = self.scalar(node)
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
        if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if hint is str and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return str(raw)  # e.g. a device number "195"
        if not isinstance(raw, hint) or (hint is int and isinstance(raw, bool)):
            raise self.fail(node, f"'{full}' must be {names[hint]}, not {raw!r}")
        return raw

    def check(self, fld: dataclasses.Field, value: Any, node: yaml.Node, full: str) -> Any:
        meta = fld.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise self.fail(node, f"'{full}' must be one of {', '.join(meta['choices'])}, "
                                  f"not {value!r}")
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise self.fail(node, f"'{full}' must be at least {meta['minimum']}, not {value!r}")
        if meta.get("power_of_two") and value & (value - 1):
            raise self.fail(node, f"'{full}' must be a power of two, not {value!r}")
        if full == "sensor.errnos" and not is_errno_name(value):
            raise self.fail(node, f"'{full}': unknown errno name {value!r}")
        if full == "sensor.extra_prefixes" and not prefix_ok(value):
            raise self.fail(node, f"'{full}': {value!r} must be an absolute path of at most "
                                  f"{PREFIX_CAP} bytes")
        if full == "sensor.extra_devices":
            try:
                device_pair(value)
            except ValueError:
                raise self.fail(node, f"'{full}': {value!r} is not MAJOR or MAJOR:MINOR") from None
        if full == "metrics.port" and value > 65535:
            raise self.fail(node, f"'{full}' must be at most 65535, not {value}")
        return value


def parse(text: str, path: str = "<config>") -> Config:
    """The configuration in `text`; raises BadInput with file:line and a reason."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise BadInput(f"{path}{line}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except (ValueError, RecursionError) as exc:  # e.g. a %YAML version of 5,000 digits
        raise BadInput(f"{path}: not valid YAML: {type(exc).__name__}") from None
    if root is None:
        return Config()
    try:
        config: Config = _Reader(path).section(Config, root, "")
    except yaml.YAMLError as exc:  # a tag SafeLoader cannot construct (!!python/object:...)
        raise BadInput(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not config.sensor.errnos:
        raise BadInput(f"{path}: 'sensor.errnos' must name at least one errno")
    return config


def load(path: Optional[str] = None) -> Config:
    """Read `path` (default /etc/gputrace/config.yaml); a missing default file means defaults."""
    explicit = path is not None
    path = path or DEFAULT_PATH
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        if explicit:
            raise BadInput(f"{path}: no such configuration file") from None
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read the configuration: "
                       f"{getattr(exc, 'strerror', None) or exc}") from None
    return parse(text, path)


def _rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    hints = get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        name = prefix + fld.name
        if dataclasses.is_dataclass(hints[fld.name]):
            rows.extend(_rows(hints[fld.name], name + "."))
            continue
        default = _default(fld)
        kind = _type_name(hints[fld.name])
        text = fld.metadata["doc"]
        if fld.metadata.get("choices"):
            text += " One of: " + ", ".join(f"`{c}`" for c in fld.metadata["choices"]) + "."
        rows.append((name, kind, f"`{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}`", text))
    return rows


def _default(fld: dataclasses.Field) -> Any:
    if fld.default is not dataclasses.MISSING:
        return fld.default
    factory: Any = fld.default_factory
    return factory()


def _type_name(hint: Any) -> str:
    if get_origin(hint) is list:
        return "list of " + _type_name(get_args(hint)[0])
    if get_origin(hint) is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(hint))
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(hint, str(hint))


def docs_table() -> str:
    """The Markdown reference table of every key, its type, default and meaning."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | {d} | {m} |" for k, t, d, m in _rows(Config, "")]
    return "\n".join(lines) + "\n"


def example_yaml() -> str:
    """A complete configuration file holding every default."""
    return yaml.safe_dump(dataclasses.asdict(Config()), sort_keys=False)


if __name__ == "__main__":  # regenerate docs/configuration.md's table
    print(docs_table(), end="")
