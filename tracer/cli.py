"""Command line: parses arguments, picks sinks, calls the core.  Errors are one line."""

from __future__ import annotations

import errno as errno_mod
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Callable, Optional, TextIO

if TYPE_CHECKING:
    from tracer.config import Config
    from tracer.event import Event
    from tracer.host import HostPaths
    from tracer.pipeline import Sink

import click

from tracer import __version__
from tracer.errors import ExitStatus, GputraceError
from tracer.event import errno_name, errno_number


def _fail(message: str, status: int) -> "None":
    click.echo(f"gputrace: error: {message}", err=True)
    sys.exit(int(status))


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: every failure becomes one line on stderr and an exit status."""
    try:
        cli.main(args=argv, prog_name="gputrace", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(int(ExitStatus.INTERRUPTED))
    except click.UsageError as exc:
        hint = f" (see gputrace {exc.ctx.info_name} --help)" if exc.ctx else ""
        _fail(exc.format_message().replace("\n", " ") + hint, ExitStatus.USAGE)
    except click.ClickException as exc:
        _fail(exc.format_message().replace("\n", " "), ExitStatus.BAD_INPUT)
    except GputraceError as exc:
        _fail(str(exc), exc.status)
    except KeyboardInterrupt:
        sys.exit(int(ExitStatus.INTERRUPTED))
    except BrokenPipeError:
        sys.exit(int(ExitStatus.SUCCESS))
    except Exception as exc:  # last resort: still one line, never a traceback
        if os.environ.get("GPUTRACE_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (GPUTRACE_DEBUG=1 shows a traceback)",
              ExitStatus.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gputrace")
def cli() -> None:
    """gputrace: why was a process denied a GPU device node?"""


def _parse_errnos(_ctx: object, _param: object, value: str) -> tuple[str, ...]:
    """Names (as the configuration holds them) from names or numbers."""
    from tracer import config as config_mod

    try:
        names = tuple(errno_name(errno_number(v.strip())) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    for name in names:
        if not config_mod.is_errno_name(name):
            raise click.BadParameter(f"unknown errno {name!r}")
    return names


def _check_prefixes(_ctx: object, _param: object, values: tuple[str, ...]) -> tuple[str, ...]:
    from tracer import config as config_mod

    for v in values:
        if not config_mod.prefix_ok(v):
            raise click.BadParameter(f"{v!r} must be an absolute path of at most "
                                     f"{config_mod.PREFIX_CAP} bytes")
    return values


def _parse_devices(_ctx: object, _param: object, values: tuple[str, ...]) -> tuple[str, ...]:
    from tracer import config as config_mod

    for v in values:
        try:
            config_mod.device_pair(v)
        except ValueError:
            raise click.BadParameter(f"{v!r} is not MAJOR or MAJOR:MINOR") from None
    return values


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--errno", "errnos", default="EACCES,EPERM", show_default=True,
              callback=_parse_errnos, help="Errors to report (e.g. add ENOENT,ENXIO).")
@click.option("--prefix", "prefixes", multiple=True, callback=_check_prefixes,
              help="Extra path prefix to watch (repeatable).")
@click.option("--device", "devices", multiple=True, callback=_parse_devices,
              help="Extra MAJOR or MAJOR:MINOR whose ioctls to watch (repeatable).")
@click.option("--sensor", "sensor_name", type=click.Choice(["auto", "bpf", "audit"]), default="auto",
              show_default=True, help="auto uses BPF and falls back to Linux audit.")
@click.option("--hook", type=click.Choice(["auto", "fexit", "tracepoint"]), default="auto",
              show_default=True, help="Kernel hook; auto tries fexit and falls back.")
@click.option("--transport", type=click.Choice(["auto", "ringbuf", "perf"]), default="auto",
              show_default=True)
@click.option("--duration", type=float, default=None, help="Stop after SECONDS.")
@click.option("--btf", "btf_path", default=None, help="BTF file (default /sys/kernel/btf/vmlinux).")
@click.option("--tracefs", default="/sys/kernel/tracing", show_default=True)
@click.option("--no-explain", is_flag=True, help="Only report denials; skip enrichment and verdicts.")
@click.option("--nodes/--no-nodes", "watch_nodes", default=True, show_default=True,
              help="Also report GPU nodes appearing, disappearing or changing mode/owner.")
@click.option("--standalone", is_flag=True,
              help="Load a probe of our own even when a gputrace daemon is running.")
@click.option("--config", "config_path", default=None, metavar="PATH",
              help="Daemon configuration, to find its socket (default /etc/gputrace/config.yaml).")
def watch(as_json: bool, errnos: tuple[str, ...], prefixes: tuple[str, ...], devices: tuple[str, ...],
          sensor_name: str, hook: str, transport: str, duration: Optional[float],
          btf_path: Optional[str], tracefs: str, no_explain: bool, watch_nodes: bool,
          standalone: bool, config_path: Optional[str]) -> None:
    """Print each GPU-node denial as it happens; Ctrl-C prints a summary."""
    from tracer import config as config_mod
    from tracer.sinks.console import ConsoleSink

    if not errnos:
        raise click.BadParameter("at least one errno", param_hint="--errno")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if duration is not None:
        timer = threading.Timer(duration, stop.set)
        timer.daemon = True
        timer.start()
    sinks: list["Sink"] = [ConsoleSink(sys.stdout, as_json)]
    loaded = config_mod.load(config_path)  # pipeline bounds; defaults without a file
    if not standalone:
        from tracer.subscribe import attach, follow

        subscription = attach(loaded.socket_path)
        if subscription is not None:
            say(f"attached to the running gputrace daemon (pid {subscription.daemon_pid}) at "
                f"{loaded.socket_path}; its sensor and settings apply (--standalone loads a "
                "probe of our own)")
            summary = follow(subscription, sinks, stop, say)
            say(f"{summary.line()}; the daemon dropped {subscription.dropped} events for this "
                "slow reader")
            return
        say(f"no daemon at {loaded.socket_path}; running standalone")
    settings = config_mod.with_sensor(
        loaded, kind=sensor_name, errnos=errnos, extra_prefixes=prefixes, extra_devices=devices,
        hook=hook, transport=transport, tracefs=tracefs, btf=btf_path, watch_nodes=watch_nodes,
        explain=not no_explain)
    _run_standalone(settings, sinks, stop)


def _run_standalone(settings: "Config", sinks: list["Sink"], stop: threading.Event) -> None:
    from tracer.assembly import build_pipeline, explain_stages_for, start_sources

    host = settings.host_paths()
    sources = start_sources(settings, host, say)
    try:
        names = ",".join(errno_mod.errorcode.get(e, str(e)) for e in settings.errno_numbers())
        say(f"watching {names} on GPU nodes ({sources.how}); Ctrl-C to stop")
        pipeline = build_pipeline(settings, sources, explain_stages_for(settings, host), sinks,
                                  _stage_error_reporter())
        summary = pipeline.run(stop)
    finally:
        sources.close()
    say(summary.line())


def say(message: str) -> None:
    click.echo(f"gputrace: {message}", err=True)


def _stage_error_reporter() -> "Callable[[Event, Exception], None]":
    shown = {"n": 0}

    def report(event: "Event", exc: Exception) -> None:
        shown["n"] += 1
        if shown["n"] <= 5:  # rate-limited: the count is in the summary
            click.echo(f"gputrace: could not explain pid {event.process.pid}: "
                       f"{type(exc).__name__}: {exc}", err=True)
    return report


@cli.command()
@click.argument("source", type=click.File("r", encoding="utf-8", errors="surrogateescape"))
@click.option("--json", "as_json", is_flag=True, help="Write explained events as JSON lines.")
def explain(source: "TextIO", as_json: bool) -> None:
    """Re-explain recorded JSON events (a file, or - for stdin) offline."""
    from collections import Counter

    from tracer.sinks.console import ConsoleSink
    from tracer.verdict.explain import explain_records

    errors: Counter[str] = Counter()
    sink = ConsoleSink(sys.stdout, as_json)
    explained = 0
    for record in explain_records(source, errors=errors):
        if record.event is not None:
            explained += 1
            sink.consume(record.event)
    bad = sum(errors.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
    if explained == 0 and bad:
        raise GputraceError(f"{getattr(source, 'name', 'input')}: no event could be read "
                            f"({bad} bad lines: {detail})", ExitStatus.BAD_INPUT)
    if bad:
        click.echo(f"gputrace: skipped {bad} unreadable lines ({detail})", err=True)


@cli.command()
@click.option("--user", "user", default=None, help="User to check (default: the invoking user).")
@click.option("--runtime", default=None,
              help="host, podman-runc, podman-crun-keep-groups, docker-device or docker-bind-mount "
                   "(default: all).")
@click.option("--containers", is_flag=True,
              help="Instead: GPU nodes running containers can open now that the next re-apply "
                   "of their device rules (daemon-reload, an update, a restart) takes away.")
@click.option("--state-root", "state_roots", multiple=True, metavar="DIR",
              help="With --containers: another runc state root to read (e.g. a docker "
                   "--exec-root's runtime-runc/moby); repeatable.")
@click.option("--json", "as_json", is_flag=True)
def check(user: Optional[str], runtime: Optional[str], containers: bool,
          state_roots: tuple[str, ...], as_json: bool) -> None:
    """Predict, without tracing, which GPU nodes USER can open here and under common runtimes."""
    import json as _json

    from tracer.host import HostPaths
    from tracer.sinks.terminal_text import escape
    from tracer.verdict.check import check_access

    if containers:
        _check_containers(HostPaths(), state_roots, as_json)
        return
    if user is None:
        user = os.environ.get("SUDO_USER") or _login_name()
    rows = check_access(HostPaths(), user, runtime)
    if as_json:
        for row in rows:
            click.echo(_json.dumps(row.to_json()))
        return
    if not rows:
        click.echo("no GPU device nodes found under /dev")
        return
    click.echo(f"{'node':<28}{'runtime':<26}{'result':<10}reason")
    for row in rows:
        result = "ok" if row.allowed else "unknown" if row.allowed is None else (row.errno or "denied")
        click.echo(f"{escape(row.node):<28}{row.runtime:<26}{result:<10}{row.reason or ''}")
        if not row.allowed and row.fix:
            click.echo(f"{'':<28}fix: {escape(str(row.fix))}")
        if not row.allowed:
            click.echo(f"{'':<28}ladder: {escape(' · '.join(row.ladder))}")
        for later in row.then:
            click.echo(f"{'':<28}{escape(later)}")


def _check_containers(host: "HostPaths", state_roots: tuple[str, ...], as_json: bool) -> None:
    """`check --containers`: the at-risk list first, then every other GPU node seen."""
    import json as _json

    from tracer.sinks.terminal_text import escape
    from tracer.verdict.check_containers import check_containers

    rows = check_containers(host, [(os.path.abspath(d), "runc") for d in state_roots])
    if as_json:
        for row in rows:
            click.echo(_json.dumps(row.to_json()))
        return
    if not rows:
        click.echo("no running container has a GPU node in its /dev")
        return
    risky = [r for r in rows if r.at_risk]
    click.echo(f"{len(risky)} GPU node(s) in running containers will be lost at the next "
               "re-apply of their device rules (daemon-reload, an update, a restart):")
    click.echo(f"{'container':<24}{'node':<24}{'device':<12}{'now':<9}{'in config':<11}"
               f"{'/dev/char':<11}driver")
    for row in sorted(rows, key=lambda r: not r.at_risk):
        yes = {True: "yes", False: "no", None: "?"}
        click.echo(f"{escape(row.container)[:23]:<24}{escape(row.node)[:23]:<24}{row.device:<12}"
                   f"{yes[row.allowed_now]:<9}{yes[row.in_config]:<11}"
                   f"{yes[row.dev_char_link]:<11}{row.manager}")
        click.echo(f"{'':<4}{'LOST AT RE-APPLY: ' if row.at_risk else ''}{escape(row.why)}")
        for command in row.fixes[:2]:
            click.echo(f"{'':<4}fix: {escape(command)}")


def _login_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _register_service_commands() -> None:
    from tracer.commands_service import daemon_command, report_command

    cli.add_command(daemon_command)
    cli.add_command(report_command)


_register_service_commands()

if __name__ == "__main__":
    main()
