"""Our own logic around the BPF sensor, on constructed input and fixture trees."""

from __future__ import annotations

import json
import os
import struct

import pytest

from tracer.errors import EnvironmentProblem
from tracer.event import Event
from tracer.sensors import bpf_event, gpu_nodes
from tracer.sensors.bpf_event import DecodeError, Update
from tracer.sensors.btf import KernelBtf
from tracer.sensors.kernel_headers import find_headers
from tracer.sinks.terminal_text import escape


def raw_event(**over) -> bytes:
    f = dict(kind=1, sys=3, err=13, tgid=10, tid=11, ppid=1, ts=2_000_000_000, count=1,
             ktgid=10, ksys=3, kerr=13, target=0xABC, cgroup=77, devcg=0, flags=2, cap=0, dev=0,
             path_flags=0, ids=(1000, 1001, 1002, 1003, 1004, 1005), ngroups=2, uns=(4026531837, 0, 0),
             ns=(1, 2, 3, 10), audit=(1000, 5), seccomp=(0, 0), dirfd=-100, path_len=12,
             progs=(0,) + (0,) * bpf_event.MAX_DEV_PROGS,
             groups=[27, 44], comm=b"cat", path=b"/dev/nvidia0", given=b"/dev/nvidia0",
             cgroup_leaf=b"", cgroup_parent=b"")
    f.update(over)
    return bpf_event.FULL.pack(
        f["kind"], f["sys"], f["err"], f["tgid"], f["tid"], f["ppid"], f["ts"], f["count"],
        f["ktgid"], f["ksys"], f["kerr"], f["target"], f["cgroup"], f["devcg"], f["flags"], f["cap"],
        f["dev"], f["path_flags"], *f["ids"], f["ngroups"], *f["uns"], *f["ns"], *f["audit"],
        *f["seccomp"], f["dirfd"], f["path_len"], *f["progs"], f["comm"], f["path"],
        f["given"], f["cgroup_leaf"], f["cgroup_parent"]) + struct.pack(
            f"<{len(f['groups'])}I", *f["groups"])


def test_layout_sizes_match_the_c_struct():
    # the C side asserts offsetof(struct gpu_event, groups) == EVENT_GROUPS_OFFSET
    assert bpf_event.EVENT_GROUPS_OFFSET == 996 and bpf_event.UPDATE_SIZE == 56
    assert bpf_event.EVENT_MAX_SIZE == 996 + 4 * bpf_event.MAX_GROUPS


def test_decode_groups_tail_up_to_the_true_count():
    many = list(range(5000, 5040))
    ev = bpf_event.decode(raw_event(ngroups=40, groups=many), 0).event
    assert ev.process.groups == many and ev.process.ngroups == 40
    capped = bpf_event.decode(raw_event(ngroups=70000, groups=list(range(bpf_event.MAX_GROUPS))),
                              0).event
    assert len(capped.process.groups or []) == bpf_event.MAX_GROUPS  # the lowest ones
    assert capped.process.ngroups == 70000
    with pytest.raises(DecodeError):  # a tail shorter than ngroups says
        bpf_event.decode(raw_event(ngroups=40, groups=many[:39]), 0)


def test_decode_device_programs_named_by_the_probe():
    ids = (7, 9) + (0,) * (bpf_event.MAX_DEV_PROGS - 2)
    named = bpf_event.decode(raw_event(progs=(2,) + ids, path_flags=bpf_event.F_DEV_PROGS_KNOWN), 0)
    assert isinstance(named, bpf_event.Denial)
    assert named.dev_prog_ids == (7, 9) and not named.dev_progs_over
    unread = bpf_event.decode(raw_event(progs=(2,) + ids), 0)
    assert isinstance(unread, bpf_event.Denial) and unread.dev_prog_ids is None  # flag unset
    over = bpf_event.decode(raw_event(progs=(bpf_event.MAX_DEV_PROGS + 1,) + ids,
                                      path_flags=bpf_event.F_DEV_PROGS_KNOWN), 0)
    assert isinstance(over, bpf_event.Denial) and over.dev_progs_over
    insns = bytes(range(16))
    record = bpf_event.DEV_PROG.pack(bpf_event.EV_DEV_PROG, 7, 15, 2, 2, 0, b"\x01" * 8,
                                     b"sd_devices") + insns
    prog = bpf_event.decode(record, 0)
    assert isinstance(prog, bpf_event.DevProgRecord)
    assert (prog.id, prog.type, prog.name, prog.tag, prog.insns, prog.truncated) == \
        (7, 15, "sd_devices", "01" * 8, insns, False)
    with pytest.raises(DecodeError):  # claims more instructions than it carries
        bpf_event.decode(bpf_event.DEV_PROG.pack(3, 7, 15, 5, 5, 0, b"", b"") + insns, 0)


def test_decode_cgroup_names_only_when_the_kernel_named_them():
    cid = "ab" * 32
    named = bpf_event.decode(raw_event(cgroup_leaf=f"docker-{cid}.scope".encode(),
                                       cgroup_parent=b"system.slice",
                                       path_flags=bpf_event.F_CGROUP_NAMED), 0).event
    assert named.process.cgroup_leaf == f"docker-{cid}.scope".encode()
    assert (named.process.cgroup_parent, named.process.cgroup_hierarchy) == (b"system.slice", "v2")
    v1 = bpf_event.decode(raw_event(cgroup_leaf=cid.encode(), cgroup_parent=b"docker",
                                    path_flags=bpf_event.F_CGROUP_NAMED | bpf_event.F_CGROUP_V1),
                          0).event
    assert v1.process.cgroup_hierarchy == "v1 devices"
    # stale bytes in the kernel's scratch buffer mean nothing without the flag
    unnamed = bpf_event.decode(raw_event(cgroup_leaf=b"libpod-x", cgroup_parent=b"y"), 0).event
    assert (unnamed.process.cgroup_leaf, unnamed.process.cgroup_hierarchy) == (None, None)
    assert "cgroup_leaf" not in unnamed.to_json()["process"]  # not captured: absent
    back = Event.from_json(named.to_json())
    assert back.process.cgroup_leaf == named.process.cgroup_leaf
    assert back.process.cgroup_hierarchy == "v2"


def test_decode_seccomp_state_only_when_the_kernel_captured_it():
    known = bpf_event.decode(raw_event(seccomp=(2, 3), path_flags=bpf_event.F_SECCOMP_KNOWN),
                             clock_offset=0.0)
    assert isinstance(known, bpf_event.Denial)
    assert (known.event.process.seccomp_mode, known.event.process.seccomp_filters) == (2, 3)
    wire = known.event.to_json()["process"]
    assert (wire["seccomp_mode"], wire["seccomp_filters"]) == (2, 3)
    unknown = bpf_event.decode(raw_event(seccomp=(2, 3)), clock_offset=0.0)
    assert isinstance(unknown, bpf_event.Denial)
    assert unknown.event.process.seccomp_mode is None  # flag unset: not captured, never 0
    assert "seccomp_mode" not in unknown.event.to_json()["process"]


def test_decode_full_event():
    denial = bpf_event.decode(raw_event(), clock_offset=100.0)
    assert isinstance(denial, bpf_event.Denial)
    ev = denial.event
    assert ev.key == denial.key.label()
    assert ev.time == pytest.approx(102.0)
    assert (ev.process.pid, ev.process.tid, ev.process.uid, ev.process.euid) == (10, 11, 1000, 1002)
    assert ev.process.groups == [27, 44] and ev.process.loginuid == 1000
    assert ev.node.path == b"/dev/nvidia0" and ev.node.major is None
    assert ev.syscall == "openat" and ev.errno_name == "EACCES" and ev.open_flags == 2


def test_decode_relative_ioctl_and_update():
    rel = bpf_event.decode(raw_event(path_flags=bpf_event.F_RELATIVE, given=b"nvidia0"), 0).event
    assert rel.node.path == b"/dev/nvidia0" and rel.node.path_as_given == b"nvidia0"
    same = bpf_event.decode(raw_event(), 0).event
    assert same.node.path_as_given is None  # spelt as normalised: nothing extra to keep
    io = bpf_event.decode(raw_event(sys=5, dev=(195 << 20) | 255, path_flags=bpf_event.F_DEV_VALID,
                                    flags=0xC0104601), 0).event
    assert (io.node.major, io.node.minor, io.ioctl_cmd) == (195, 255, 0xC0104601)
    upd = bpf_event.decode(raw_event(kind=2)[:bpf_event.UPDATE_SIZE], 0)
    assert isinstance(upd, Update) and upd.key.target == 0xABC


@pytest.mark.parametrize("data,reason", [
    (b"", "short_record"), (b"\x01" * 20, "short_record"),
    (raw_event(kind=9), "bad_kind"), (raw_event(sys=42), "bad_syscall"),
    (raw_event()[:100], "short_record"),
])
def test_decode_rejects_malformed_records_with_a_reason(data, reason):
    with pytest.raises(DecodeError) as info:
        bpf_event.decode(data, 0)
    assert info.value.reason == reason


def test_event_json_round_trip_is_lossless_for_invalid_utf8():
    ev = bpf_event.decode(raw_event(comm=b"a\xffb", path=b"/dev/nvidia\xfe\x1b", path_len=14), 0).event
    doc = json.loads(json.dumps(ev.to_json()))
    assert "comm_b64" in doc["process"] and "path_b64" in doc["node"]
    back = Event.from_json(doc)
    assert back.process.comm == b"a\xffb" and back.node.path == b"/dev/nvidia\xfe\x1b"


@pytest.mark.parametrize("raw,shown", [
    (b"plain/path", "plain/path"),
    (b"\x1b[2J", "\\x1b[2J"),
    (b"a\\b", "a\\\\b"),
    (b"\xff\xfe", "\\xff\\xfe"),
    ("\u202eevil".encode(), "\\u202eevil"),
    ("caf\u00e9".encode(), "caf\u00e9"),
    (b"\x00\x7f", "\\x00\\x7f"),
])
def test_escape_makes_terminal_text_safe(raw, shown):
    assert escape(raw) == shown


def test_escape_bounds_long_input():
    out = escape(b"a" * 5000, limit=4096)
    assert out.startswith("a" * 4096) and out.endswith("(+904 chars)")


PROC_DEVICES = """Character devices:
  1 mem
195 nvidia-frontend
226 drm
234 nvidia-uvm
235 nvidia-caps
236 nvidia-nvswitch
 10 misc
garbage line
Block devices:
235 nvidia-not-a-char
"""


def test_gpu_majors_from_proc_devices(tmp_path):
    (tmp_path / "devices").write_text(PROC_DEVICES)
    nodes = gpu_nodes.discover(proc=str(tmp_path), dev=str(tmp_path / "nodev"))
    assert set(nodes.majors) == {195, 226, 234, 235, 236}
    assert "/dev/char/234:" in nodes.prefixes and "/dev/nvidia" in nodes.prefixes
    assert gpu_nodes.mkdev(234, 0xFFFFF) in nodes.kernel_dev_keys()
    assert 10 not in nodes.majors  # the shared misc major is never matched whole


def _header_tree(root, name, common=True):
    arch = root / name
    (arch / "arch/x86/include/generated").mkdir(parents=True)
    (arch / "include/generated").mkdir(parents=True)
    if common:
        base = root / name.replace("-amd64", "-common")
        (base / "include/linux").mkdir(parents=True)
        (base / "include/linux/kconfig.h").write_text("")
        (base / "arch/x86/include/asm").mkdir(parents=True)
        (arch / "Makefile").write_text(f"include {base}/Makefile\n")
    return arch


def test_headers_split_debian_package_is_joined(tmp_path):
    src = tmp_path / "src"
    _header_tree(src, "linux-headers-6.1.0-9-amd64")
    _header_tree(src, "linux-headers-6.1.0-56-amd64")
    choice = find_headers(release="6.18.0-test", modules_root=str(tmp_path / "mods"),
                          src_root=str(src), cache_dir=str(tmp_path / "cache"), machine="x86_64",
                          environ={})
    assert choice.source.endswith("linux-headers-6.1.0-56-amd64")  # newest wins (56 > 9)
    assert os.path.exists(os.path.join(choice.source, "include/linux/kconfig.h"))
    assert os.path.isdir(os.path.join(choice.source, "arch/x86/include/generated"))
    assert os.path.isdir(os.path.join(choice.source, "arch/x86/include/asm"))
    assert "6.1.0-56" in choice.description


def test_headers_default_build_dir_needs_nothing(tmp_path):
    (tmp_path / "mods/6.18.0/build/include").mkdir(parents=True)
    choice = find_headers(release="6.18.0", modules_root=str(tmp_path / "mods"),
                          src_root=str(tmp_path / "none"), environ={})
    assert choice.source is None and choice.description == ""


def test_no_headers_is_a_clear_error(tmp_path):
    with pytest.raises(EnvironmentProblem, match="no usable kernel headers"):
        find_headers(release="6.18.0", modules_root=str(tmp_path), src_root=str(tmp_path),
                     environ={})


def test_btf_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(EnvironmentProblem, match="no BTF"):
        KernelBtf(str(tmp_path / "vmlinux"))


@pytest.mark.kernel
def test_btf_offsets_of_the_running_kernel():
    with KernelBtf() as btf:
        assert btf.member("user_namespace.ns.inum").size == 4
        assert btf.member("file.f_path").size == 16  # inside an anonymous union on 6.18
        with pytest.raises(KeyError):
            btf.member("task_struct.no_such_member")
        assert btf.size_of("upid") == 16  # int nr + pointer, padded


MAPS = """7f0000000000-7f0000100000 r--p 00000000 fd:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0000100000-7f0002000000 r-xp 00100000 fd:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0002000000-7f0002100000 rw-p 02000000 fd:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0003000000-7f0003800000 r-xp 00000000 fd:01 2 /usr/lib/x86_64-linux-gnu/libclang-cpp.so.14
7f0004000000-7f0004100000 r-xp 00000000 fd:01 3 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0005000000-7f0005100000 rwxp 00000000 00:00 0 /usr/lib/x86_64-linux-gnu/libbcc.so.0
"""


def test_only_read_only_compiler_code_is_released():
    from tracer.sensors.compiler_memory import compiler_code_ranges

    assert compiler_code_ranges(MAPS) == [(0x7F0000100000, 0x7F0002000000),
                                          (0x7F0003000000, 0x7F0003800000)]


# ------------------------------------------------------- the sensor's bookkeeping

class _AggTable(dict):  # type: ignore[type-arg]
    """The kernel's `agg` hash as BCC shows it: items() of (key, value) structs."""

    class Key:
        def __init__(self, tgid: int = 0, sys: int = 0, err: int = 0, target: int = 0) -> None:
            self.tgid, self.sys, self.err, self.target = tgid, sys, err, target

        def _id(self) -> tuple[int, int, int, int]:
            return (self.tgid, self.sys, self.err, self.target)

        def __hash__(self) -> int:
            return hash(self._id())

        def __eq__(self, other: object) -> bool:
            return isinstance(other, _AggTable.Key) and self._id() == other._id()


class _Count:
    def __init__(self, count: int) -> None:
        self.count = count


class _Kernel:
    """A loaded program's maps and ring buffer: records wait in `buffered` until consumed."""

    def __init__(self, sensor: Any) -> None:
        self.agg = _AggTable()
        self.buffered: list[bytes] = []
        self.sensor = sensor

    def __getitem__(self, name: bytes) -> Any:
        assert name == b"agg"
        return self.agg

    def ring_buffer_consume(self) -> None:
        records, self.buffered = self.buffered, []
        for raw in records:
            self.sensor._ingest(raw)

    def deny(self, tgid: int, target: int = 0x1234, **over: Any) -> None:
        """What the probe does at a refusal: count it in the table, send the first record."""
        self.agg[_AggTable.Key(tgid, 3, 13, target)] = _Count(1)
        self.buffered.append(raw_event(tgid=tgid, tid=tgid, ktgid=tgid, target=target, **over))


def _sensor() -> tuple[Any, _Kernel]:
    from tracer.sensors.bpf_sensor import BpfSensor
    sensor = BpfSensor(say=lambda msg: None)
    sensor.transport = "ringbuf"
    kernel = _Kernel(sensor)
    sensor.bpf = kernel
    return sensor, kernel


def _gone_pid() -> int:
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid += 1
    return pid


def test_a_sweep_between_the_count_and_the_buffer_read_loses_no_denial() -> None:
    """Seen under `gputrace watch`: `cat` refused and exited between the sensor's read of
    the ring buffer and its sweep of the aggregation table.  The sweep found a count for
    a gone process with no first event, reported an empty 'first event lost' event
    (no credentials, no path: verdict unknown), and the real record, read next, was
    taken for a resend and dropped."""
    sensor, kernel = _sensor()
    pid = _gone_pid()
    kernel.deny(pid)          # counted and sent, not read yet
    sensor.sweep()            # the process is gone: its aggregate is final
    events = list(sensor._queue)
    assert len(events) == 1, events
    assert events[0].node.path == b"/dev/nvidia0" and events[0].process.comm == b"cat"
    assert not events[0].facts.get("sensor.first_event_lost")
    assert sensor._user_stats["first_event_lost"] == 0


def test_gputrace_s_own_look_ups_are_not_reported() -> None:
    """With ENOENT watched, the enrichment's own O_PATH open of a node that is not there
    was reported as a denial of comm 'gputrace' (and, with two tracers, each reported
    the other's)."""
    sensor, kernel = _sensor()
    kernel.deny(os.getpid(), err=2, kerr=2)
    kernel.ring_buffer_consume()
    kernel.agg[_AggTable.Key(os.getpid(), 3, 13, 0x1234)] = _Count(5)  # repeats since
    sensor.sweep(final=True)
    assert list(sensor._queue) == []
    assert sensor._user_stats["own_lookups"] == 1
