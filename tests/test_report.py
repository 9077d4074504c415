"""`gputrace report`: counts by cause from a journal, the host snapshot of a recorded
host tree, the JSON Schema, Markdown for bug trackers, and consistent redaction."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest

from tests.support.daemon_proc import REPO, run_cli, write_config
from tests.support.sample_events import denial, update
from tracer.enrichment.node import FixtureNodeStats
from tracer.errors import BadInput
from tracer.host import HostPaths
from tracer.sinks.journal import CURRENT, JournalSink
from tracer.sinks.report import ReportInputs, build_report, parse_duration, report_schema
from tracer.enrichment.host_snapshot import recorded_versions
from tracer.sinks.report_markdown import redact, render_markdown, token

HOST = os.path.join(REPO, "tests", "fixtures", "hosts", "report-gpubox")
T0 = 1_800_000_000.0


@pytest.fixture
def journal(tmp_path):
    sink = JournalSink(str(tmp_path))
    a = denial(100, at=T0)
    b = denial(101, engine="podman", comm=b"trainer", at=T0 + 10)
    c = denial(200, path="/dev/nvidiactl", minor=255, errno=1, reason="device_cgroup", at=T0 + 20,
               user="bob", uid=1001)
    d = denial(300, reason=None, at=T0 + 30, user=None, uid=0)
    for event in (a, b, update(a, 2, T0 + 40), c, update(b, 3, T0 + 50), d,
                  update(a, 5, T0 + 3600), update(c, 2, T0 + 3601)):
        sink.consume(event)
    sink.close()
    with open(os.path.join(str(tmp_path), CURRENT), "ab") as handle:
        handle.write(b'{"schema":1,"time":"2027-')  # the line a kill cut
    return str(tmp_path)


def report_of(journal_dir: str, since_s=None, now=T0 + 7200) -> dict:
    return build_report(ReportInputs(
        journal_dir=journal_dir, host=HostPaths.under(HOST),
        statter=FixtureNodeStats(os.path.join(HOST, "node-stats.json")),
        versions=recorded_versions(os.path.join(HOST, "tools.json")), since_s=since_s, now=now))


def test_denials_grouped_by_cause_with_exact_counts(journal):
    report = report_of(journal)
    jsonschema.validate(report, report_schema())
    assert report["totals"] == {"denials": 11, "aggregates": 4, "causes": 3, "folded": {}}
    assert report["journal"]["lost_lines"] == 1 and report["journal"]["events_read"] == 8
    first, second, third = report["causes"]
    assert (first["reason"], first["count"], first["events"]) == ("not_in_group", 8, 2)
    assert first["first_seen"] == "2027-01-15T08:00:00Z" and first["last_seen"] == "2027-01-15T09:00:00Z"
    assert [(p["pid"], p["count"], p["user"]) for p in first["processes"]] == \
        [(100, 5, "alice"), (101, 3, "alice")]
    assert first["processes"][1]["container"]["engine"] == "podman"
    assert first["processes"][0]["container"] is None
    assert first["nodes"] == [{"path": "/dev/nvidia0", "errno": "EACCES", "count": 8}]
    assert first["fixes"] == [{"summary": "add the user to the node's group",
                               "command": "sudo usermod -aG video alice", "applies_to": "host"}]
    assert (second["reason"], second["count"], second["nodes"][0]["errno"]) == ("device_cgroup", 2, "EPERM")
    assert (third["reason"], third["count"], third["confidence"]) == ("unknown", 1, None)


def test_since_counts_only_repeats_inside_the_window(journal):
    report = report_of(journal, since_s=parse_duration("1h"), now=T0 + 3600 + 1800)
    jsonschema.validate(report, report_schema())
    counts = {c["reason"]: c["count"] for c in report["causes"]}
    assert counts == {"not_in_group": 3, "device_cgroup": 1}  # 2->5 and 1->2 after T0+1800
    assert report["window"]["since"] == "2027-01-15T08:30:00Z"


def test_host_snapshot_of_a_recorded_host(journal):
    host = report_of(journal)["host"]
    assert host["hostname"] == "gpubox-07" and host["kernel"]["release"] == "6.6.30-gentoo-dist"
    assert host["distro"] == {"id": "gentoo", "pretty_name": "Gentoo Linux", "version_id": "2.15"}
    assert "550.78" in host["nvidia"]["version"] and host["nvidia"]["params"]["DeviceFileMode"] == 432
    nodes = {n["path"]: n for n in host["gpu_nodes"]}
    assert set(nodes) == {"/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/dri/card0",
                          "/dev/dri/renderD128", "/dev/nvidia-caps/nvidia-cap1"}
    gpu = nodes["/dev/nvidia0"]
    assert (gpu["mode"], gpu["owner"], gpu["group"], gpu["class"]) == ("0660", "root", "video", "nvidia-gpu")
    assert {"tag": "user", "id": 1000, "perm": "rw-", "name": "alice"} in gpu["acl"]
    assert gpu["mount"]["nodev"] is False
    render = nodes["/dev/dri/renderD128"]
    assert render["mount"]["nodev"] is True and render["selinux"].endswith("dri_device_t:s0")
    assert nodes["/dev/nvidia-caps/nvidia-cap1"]["mode"] == "0400"
    assert [e["name"] for e in host["engines"]] == ["podman"]
    assert [e["name"] for e in host["oci_runtimes"]] == ["runc", "crun", "nvidia-ctk"]
    confs = {os.path.relpath(c["path"], HOST): c for c in host["containers_conf"]}
    assert confs["etc/containers/containers.conf"]["keep_original_groups"] is True
    assert confs["etc/containers/containers.conf"]["runtime"] == "crun"
    assert confs["home/alice/.config/containers/containers.conf"]["runtime"] == "runc"
    assert "error" in confs["etc/containers/containers.conf.d/broken.conf"]
    runtime = host["nvidia_container_runtime_config"]["content"]
    assert runtime["nvidia-container-cli"]["no-cgroups"] is True
    cdi = {os.path.basename(c["path"]): c for c in host["cdi_specs"]}
    assert cdi["nvidia.yaml"]["common"]["additional_gids"] == [27]
    assert cdi["nvidia.yaml"]["devices"][0]["device_nodes"][0]["gid"] == 27
    assert cdi["nvidia-tegra.json"]["devices"][0]["device_nodes"][0] == \
        {"path": "/dev/nvmap", "host_path": "/dev/nvmap", "type": None, "major": None,
         "minor": None, "file_mode": None, "gid": 0, "uid": None, "permissions": None}
    users = {u["name"]: u for u in host["users"]}
    assert set(users) == {"root", "alice", "bob"}  # seen in denials or in video/render
    assert {"gid": 27, "name": "video"} in users["alice"]["groups"]


def test_markdown_reads_as_a_bug_report(journal):
    md = render_markdown(report_of(journal))
    assert md.startswith("# gputrace report\n\n11 GPU node denials in 4 aggregated events, 3 distinct causes")
    assert "### 1. `not_in_group`: 8 denials (2 aggregated events)" in md
    assert "| 100 | `python3` | alice | 1000 | host | 5 |" in md
    assert "| 101 | `trainer` | alice | 1000 | podman trainer | 3 |" in md
    assert "   sudo usermod -aG video alice" in md
    assert "> 1 journal line(s) could not be read back" in md
    assert "| `/dev/dri/renderD128` | drm-render | 226:128 | 0660 | root:render |" in md
    assert "<summary>CDI spec: <code>" in md and md.count("<details>") == md.count("</details>")
    for line in md.splitlines():
        if line.startswith("|"):
            assert line.endswith("|") and line.count("|") >= 3


def test_redaction_is_consistent_and_complete(journal):
    plain = report_of(journal)
    once, twice = redact(plain), redact(report_of(journal))
    assert once == twice and once["redacted"] is True
    jsonschema.validate(once, report_schema())
    text = json.dumps(once) + render_markdown(once)
    for secret in ("alice", "bob", "gpubox-07", "/srv/users/bob"):
        assert secret not in text, secret
    alice = token("user", "alice")
    assert once["causes"][0]["processes"][0]["user"] == alice
    assert once["causes"][0]["fixes"][0]["command"] == f"sudo usermod -aG video {alice}"
    assert once["host"]["hostname"] == token("host", "gpubox-07")
    assert any(u["home"] == f"/home/{token('user', 'bob')}" for u in once["host"]["users"])
    assert "root" in text and "video" in text  # system names stay


def test_parse_duration():
    assert parse_duration("90s") == 90 and parse_duration("1h30m") == 5400
    assert parse_duration("7d") == 7 * 86400 and parse_duration("2w") == 14 * 86400
    for bad in ("", "10", "5 minutes", "-1h", "1y"):
        with pytest.raises(BadInput, match="--since"):
            parse_duration(bad)


def test_cli_report_to_file_on_this_host(journal, tmp_path):
    state = tmp_path / "state"
    os.makedirs(state)
    os.symlink(journal, state / "journal")
    config = write_config(str(tmp_path), {"state_dir": str(state)})
    out = tmp_path / "report.json"
    done = run_cli("report", "--config", config, "--format", "json", "--redact", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "report written to" in done.stderr and "11 denials, 3 causes" in done.stderr
    report = json.loads(out.read_text())
    jsonschema.validate(report, report_schema())  # the live host's snapshot fits too
    assert report["redacted"] and report["host"]["kernel"]["release"] == os.uname().release
    assert any(e["name"] == "podman" for e in report["host"]["engines"])
    assert {"runc", "crun"} <= {r["name"] for r in report["host"]["oci_runtimes"]}
    missing = run_cli("report", "--config", write_config(str(tmp_path), {"state_dir": str(tmp_path / "no")}, "m.yaml"))
    assert missing.returncode == 5 and "no journal at" in missing.stderr
    bad = run_cli("report", "--config", config, "--since", "yesterday")
    assert bad.returncode == 5 and bad.stderr.count("\n") == 1


def test_timeline_shows_a_node_created_after_the_first_denial(tmp_path):
    """CAUSES #8: the node appeared late.  The timeline puts the first denial
    before the node's creation; node events do not count as denials."""
    from tracer.sensors.node_watch import NodeState, node_event

    sink = JournalSink(str(tmp_path))
    first = denial(100, path="/dev/nvidia-uvm", at=T0)
    created = node_event("created", b"/dev/nvidia-uvm", NodeState(0o20666, 0, 0, os.makedev(511, 0)),
                         "inotify")
    created.time = T0 + 5
    for event in (first, created):
        sink.consume(event)
    sink.close()
    report = report_of(str(tmp_path))
    jsonschema.validate(report, report_schema())
    assert report["totals"]["denials"] == 1
    assert [e["what"] for e in report["timeline"]] == ["first denial (EACCES)", "node created"]
    assert report["timeline"][1]["mode"] == "0666" and report["timeline"][1]["major"] == 511
    text = render_markdown(report)
    assert "## Timeline" in text and "node created" in text
