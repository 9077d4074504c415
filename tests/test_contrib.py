"""contrib/: each file checked by its own tool where one is installed (promtool, a
real Prometheus server, podman), else parsed and cross-checked with what gputrace
exports and accepts."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.support.daemon_proc import REPO
from tests.support.sample_events import denial, update
from tests.test_systemd_unit import bounding_set
from tracer.config import parse as parse_config
from tracer.host import HostPaths
from tracer.sinks.metrics import METRIC_NAMES, DaemonState, MetricsSink
from tracer.enrichment.host_snapshot import containers_conf

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CONTRIB = os.path.join(REPO, "contrib")
ALERTS = os.path.join(CONTRIB, "prometheus", "gputrace-alerts.yml")
DASHBOARD = os.path.join(CONTRIB, "grafana", "gputrace-dashboard.json")
PODMAN_CONF = os.path.join(CONTRIB, "podman", "50-gputrace-keep-groups.conf")
UDEV = [os.path.join(CONTRIB, "udev", n) for n in ("70-gputrace-nvidia.rules", "71-gputrace-tegra.rules")]
DAEMONSET = os.path.join(CONTRIB, "kubernetes", "gputrace-daemonset.yaml")
METRIC_RE = re.compile(r"\bgputrace_[a-z_]+\b")


def promtool_check(path: str) -> None:
    done = subprocess.run(["promtool", "check", "rules", path], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_pass_promtool_and_use_exported_metrics():
    promtool_check(ALERTS)
    with open(ALERTS, encoding="utf-8") as handle:
        rules = yaml.safe_load(handle)["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"GpuNodeDenials", "GputraceLosingEvents",
                                            "GputraceProbeDetached"}
    for rule in rules:
        used = set(METRIC_RE.findall(rule["expr"]))
        assert used and used <= set(METRIC_NAMES), rule["alert"]


def grafana_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def test_dashboard_panels_query_exported_metrics_in_valid_promql(tmp_path):
    with open(DASHBOARD, encoding="utf-8") as handle:
        dashboard = json.load(handle)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and dashboard["uid"]
    for panel in panels:
        assert panel["targets"] and panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    used = set()
    for expr in grafana_exprs(dashboard):
        names = set(METRIC_RE.findall(expr))
        assert names and names <= set(METRIC_NAMES), expr
        used |= names
    assert {"gputrace_denials_total", "gputrace_events_discarded_total",
            "gputrace_probe_attached", "gputrace_last_denial_timestamp_seconds"} <= used
    rules = [{"record": f"gputrace:panel_{i}", "expr": e.replace("$__rate_interval", "5m")
              .replace("$__range", "1h").replace("$instance", ".*")}
             for i, e in enumerate(grafana_exprs(dashboard)) if not e.startswith("label_values")]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    promtool_check(str(path))  # every panel's query is valid PromQL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prom_query(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]["result"]


def test_real_prometheus_scrapes_gputrace_and_the_alert_fires(tmp_path):
    sink = MetricsSink(DaemonState())
    target = sink.serve("127.0.0.1", 0)
    first = denial(42, count=3)
    sink.consume(first)
    web = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [ALERTS],
        "scrape_configs": [{"job_name": "gputrace",
                            "static_configs": [{"targets": [f"127.0.0.1:{target}"]}]}]}))
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        bumped = False
        alerts: list = []
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                values = prom_query(web, "sum(gputrace_denials_total)")
            except OSError:
                continue
            if values and not bumped:
                sink.consume(update(first, 5, first.time + 1))  # a later scrape sees the rise
                bumped = True
            if bumped and values and float(values[0]["value"][1]) == 5:
                alerts = prom_query(web, 'ALERTS{alertname="GpuNodeDenials"}')
                if alerts:
                    break
        assert alerts, "the GpuNodeDenials alert did not fire"
        labels = alerts[0]["metric"]
        assert labels["reason"] == "not_in_group" and labels["node_class"] == "nvidia-gpu"
        assert prom_query(web, "gputrace_build_info")
    finally:
        prom.terminate()
        prom.wait(30)
        sink.close()


def test_podman_containers_conf_snippet(tmp_path):
    with open(PODMAN_CONF, "rb") as handle:
        conf = tomllib.load(handle)
    assert conf["containers"]["annotations"] == ["run.oci.keep_original_groups=1"]
    assert conf["engine"]["runtime"] == "crun"  # runc ignores the annotation
    drop_in = tmp_path / "etc" / "containers" / "containers.conf.d"
    drop_in.mkdir(parents=True)
    (drop_in / "50-gputrace-keep-groups.conf").write_bytes(open(PODMAN_CONF, "rb").read())
    seen = containers_conf(HostPaths.under(str(tmp_path)), [])
    assert [c["keep_original_groups"] for c in seen] == [True]  # what `report` shows for it
    done = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CONTAINERS_CONF": PODMAN_CONF})
    assert done.returncode == 0 and done.stdout.strip() == "crun", done.stderr


UDEV_MATCH = {"ACTION", "KERNEL", "SUBSYSTEM", "DEVPATH", "DRIVER", "ATTR", "ENV"}
UDEV_ASSIGN = {"GROUP", "MODE", "OWNER", "RUN", "TAG", "SYMLINK"}
UDEV_PAIR = re.compile(r'\s*([A-Z]+)(\{[A-Za-z_]+\})?\s*(==|!=|\+=|:=|=)\s*"([^"]*)"\s*(,|$)')


def udev_rule(line: str) -> list[tuple[str, str, str]]:
    """(key, op, value) of one rule line, or AssertionError naming what is wrong."""
    out, pos = [], 0
    while pos < len(line):
        found = UDEV_PAIR.match(line, pos)
        assert found, f"cannot parse at column {pos}: {line[pos:]!r}"
        key, _, op, value, _sep = found.groups()
        if key in UDEV_MATCH:
            assert op in ("==", "!="), f"{key} is a match key: {op}"
        else:
            assert key in UDEV_ASSIGN, f"unknown key {key}"
            assert op in ("=", "+=", ":="), f"{key} is an assignment: {op}"
        out.append((key, op, value))
        pos = found.end()
    return out


@pytest.mark.parametrize("path", UDEV, ids=os.path.basename)
def test_udev_rules_syntax(path):
    with pytest.raises(AssertionError):
        udev_rule('KERNEL="nvmap", GROUP=="video"')  # the checker does reject mistakes
    rules = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            pairs = udev_rule(line)
            rules += 1
            keys = {k for k, _, _ in pairs}
            assert keys & UDEV_MATCH and keys & UDEV_ASSIGN, line
            for key, _, value in pairs:
                if key == "MODE":
                    assert re.fullmatch(r"0[0-7]{3}", value) and not int(value, 8) & 0o007
                if key == "RUN":
                    assert value.startswith("/"), "RUN needs an absolute path"
    assert rules >= 3


def test_kubernetes_daemonset():
    with open(DAEMONSET, encoding="utf-8") as handle:
        docs = {d["kind"]: d for d in yaml.safe_load_all(handle)}
    assert set(docs) == {"Namespace", "ConfigMap", "DaemonSet"}
    ds = docs["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1" and ds["metadata"]["namespace"] == "gputrace"
    spec = ds["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["hostPID"] is True
    (container,) = pod["containers"]
    assert container["image"] and container["args"][:2] == ["daemon", "--config"]
    sc = container["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sorted("CAP_" + c for c in sc["capabilities"]["add"]) == sorted(bounding_set())
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} == volumes
    config_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    assert container["args"][2] == f"{config_dir}/config.yaml"
    cfg = parse_config(docs["ConfigMap"]["data"]["config.yaml"], "ConfigMap gputrace-config")
    host_mount = next(m for m in container["volumeMounts"] if m["name"] == "host-root")
    assert cfg.host_root == host_mount["mountPath"] and host_mount["readOnly"]
    assert cfg.sensor.tracefs.startswith(cfg.host_root)
    port = container["ports"][0]["containerPort"]
    assert port == cfg.metrics.port == int(spec["template"]["metadata"]["annotations"]["prometheus.io/port"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {cfg.state_dir, cfg.runtime_dir} <= mounts
