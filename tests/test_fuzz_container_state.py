"""Fuzz: what a user writes in a runtime state directory (runc's state.json,
crun's status, the bundle's config.json, docker's config.v2.json), in any
shape and as any kind of file, never raises, never blocks, and gives only
typed, bounded values to the snapshot."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.example_counts import fuzz, print_example_counts, ran  # noqa: F401
from tracer.enrichment.container_snapshot import snapshot_container
from tracer.enrichment.container_state import MAX_TEXT, RuntimeState, read_runtime_state
from tracer.enrichment.state_files import StateFiles
from tracer.host import HostPaths

SCALAR = st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) \
    | st.floats(allow_nan=False) | st.text(max_size=30)
ANY = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


def shaped(keys: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with the keys the reader looks for, each holding anything (or its
    expected shape), plus noise."""
    return st.fixed_dictionaries({}, optional={k: v | ANY for k, v in keys.items()}) \
        .flatmap(lambda d: st.dictionaries(st.text(max_size=6), ANY, max_size=3)
                 .map(lambda noise: {**noise, **d}))


MOUNT = shaped({"destination": st.sampled_from(["/etc/hostname", "/dev/nvidia0", "/"]),
                "source": st.text(max_size=40), "type": st.just("bind"),
                "options": st.lists(st.text(max_size=8), max_size=3)})
CONFIG = shaped({"process": shaped({"user": shaped({"uid": st.integers(), "gid": st.integers(),
                                                    "additionalGids": st.lists(ANY)})}),
                 "mounts": st.lists(MOUNT, max_size=4),
                 "annotations": st.dictionaries(st.text(max_size=40), st.text(max_size=20)),
                 "linux": shaped({"devices": st.lists(ANY, max_size=3),
                                  "resources": shaped({"devices": st.lists(ANY, max_size=3)}),
                                  "uidMappings": st.lists(ANY, max_size=3)}),
                 "root": shaped({"path": st.text(max_size=20)})})
STATE = shaped({"init_process_pid": st.integers(min_value=-5, max_value=2**40),
                "config": shaped({"labels": st.lists(st.just("bundle=/b") | st.text(max_size=20)),
                                  "rootfs": st.text(max_size=20)}),
                "cgroup_paths": st.dictionaries(st.text(max_size=10), ANY, max_size=4),
                "rootless": ANY, "created": st.text(max_size=40)})
CONTENT = st.one_of(STATE.map(json.dumps), CONFIG.map(json.dumps), ANY.map(json.dumps),
                    st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
KIND = st.sampled_from(["file", "file", "file", "fifo", "symlink", "dir", "big"])


def make(path: str, kind: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        os.symlink("/etc/passwd", path)
    elif kind == "dir":
        os.mkdir(path)
    else:
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text if kind == "file" else " " * (5 << 20))


@fuzz(1000)
@given(runtime=st.sampled_from(["runc", "crun"]), state=CONTENT, state_kind=KIND,
       config=CONTENT, config_kind=KIND)
def test_hostile_state_never_raises_and_gives_typed_values(runtime: str, state: str,
                                                           state_kind: str, config: str,
                                                           config_kind: str) -> None:
    ran("container state (hostile files)")
    base = tempfile.mkdtemp(prefix="gttest-fuzzstate-")
    try:
        root, cid = os.path.join(base, "run", runtime), "c" * 64
        state_name = "status" if runtime == "crun" else "state.json"
        text = state.replace('"/b"', json.dumps(os.path.join(base, "b")))
        make(os.path.join(root, cid, state_name), state_kind, text)
        make(os.path.join(base, "b", "config.json"), config_kind, config)
        host = HostPaths(run=os.path.join(base, "run"), proc=os.path.join(base, "proc"))
        found = read_runtime_state(host, runtime, root, cid, StateFiles())
        if found is None:
            return
        assert isinstance(found, RuntimeState)
        assert found.pid is None or (isinstance(found.pid, int) and not isinstance(found.pid, bool))
        for text_field in (found.bundle, found.rootfs, found.cgroup_path):
            assert text_field is None or (isinstance(text_field, str) and len(text_field) <= MAX_TEXT)
        found.bundle = os.path.join(base, "b") if found.bundle else None
        found.pid = None  # the pid is checked by StateFiles.init_pid, not here
        snap = snapshot_container(host, found, 0, StateFiles())
        json.dumps({k: f.value for k, f in snap.facts.items()})  # plain, serialisable values
        assert len(snap.facts) <= 64
    finally:
        shutil.rmtree(base, ignore_errors=True)
