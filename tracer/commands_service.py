"""Click commands for running gputrace as a service: `daemon` and `report`.

Registered in tracer/cli.py with ``cli.add_command(daemon_command)`` and
``cli.add_command(report_command)``.  Both read the YAML configuration
(`--config PATH`, default /etc/gputrace/config.yaml; no file means defaults).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import click

from tracer import config as config_mod
from tracer.errors import BadInput

CONFIG_HELP = f"YAML configuration (default {config_mod.DEFAULT_PATH}; defaults when absent)."


@click.command("daemon")
@click.option("--config", "config_path", default=None, metavar="PATH", help=CONFIG_HELP)
@click.option("--check-config", is_flag=True,
              help="Only validate the configuration and print it with defaults filled in.")
def daemon_command(config_path: Optional[str], check_config: bool) -> None:
    """Run the pipeline as a service: journal, event socket, Prometheus metrics.

    SIGHUP reloads the configuration; SIGTERM drains and flushes, then exits."""
    cfg = config_mod.load(config_path)
    if check_config:
        import dataclasses
        import yaml
        click.echo(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), nl=False)
        return
    from tracer.daemon import Daemon
    Daemon(cfg, config_path).run()


@click.command("report")
@click.option("--config", "config_path", default=None, metavar="PATH", help=CONFIG_HELP)
@click.option("--since", "since", default=None, metavar="DURATION",
              help="Only denials in the last DURATION (e.g. 30m, 2h, 7d).")
@click.option("--format", "fmt", type=click.Choice(["json", "markdown"]), default="markdown",
              show_default=True)
@click.option("--redact", is_flag=True,
              help="Replace user names, the host name and home paths with stable tokens.")
@click.option("-o", "--output", "output", default=None, metavar="FILE",
              help="Write to FILE instead of standard output.")
def report_command(config_path: Optional[str], since: Optional[str], fmt: str, redact: bool,
                   output: Optional[str]) -> None:
    """A post-mortem report from the daemon's journal, for a bug ticket."""
    from tracer.sinks.report import ReportInputs, build_report, parse_duration, render_json
    from tracer.sinks.report_markdown import redact as redact_report
    from tracer.sinks.report_markdown import plural, render_markdown

    cfg = config_mod.load(config_path)
    inputs = ReportInputs(journal_dir=cfg.journal_dir, host=cfg.host_paths(),
                          since_s=parse_duration(since) if since else None)
    report = build_report(inputs)
    if redact:
        report = redact_report(report)
    text = render_json(report) if fmt == "json" else render_markdown(report)
    if output is None:
        sys.stdout.write(text)
        return
    try:
        tmp = f"{output}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, output)
    except OSError as exc:
        raise BadInput(f"cannot write {output}: {exc.strerror}") from None
    totals = report["totals"]
    click.echo(f"gputrace: report written to {output} ({plural(totals['denials'], 'denial')}, "
               f"{plural(totals['causes'], 'cause')})", err=True)
