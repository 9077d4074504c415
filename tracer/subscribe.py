"""Client side of the daemon's event socket: `attach()` returns a stream of Events,
or None when no daemon is listening (then `watch` loads its own probe).

    sub = attach(config.socket_path)
    if sub is None: ...standalone...
    for event in sub.events(stop): ...
    sub.dropped   # events the daemon dropped for us because we read too slowly
"""

from __future__ import annotations

import errno as errno_mod
import grp
import json
import os
import socket
import threading
from typing import Callable, Iterator, Optional

from tracer.errors import BadInput, NoPrivilege
from tracer.event import Event
from tracer.pipeline import Pipeline, Sink, Summary

HELLO_TIMEOUT_S = 5.0


class Subscription:
    """A connected subscriber; iterate it (or `events(stop)`) for Events."""

    def __init__(self, conn: socket.socket, path: str) -> None:
        self.conn = conn
        self.path = path
        self.dropped = 0          # announced by the daemon
        self.bad_lines = 0        # lines that were not events (counted, skipped)
        self.daemon_pid: Optional[int] = None
        self._buffer = b""
        hello = self._read_message(None)
        if hello is None or hello.get("gputrace") != "hello":
            conn.close()
            raise BadInput(f"{path} is not a gputrace daemon socket")
        self.daemon_pid = hello.get("pid")
        self.version = hello.get("version")

    def _read_line(self, stop: Optional[threading.Event]) -> Optional[bytes]:
        while b"\n" not in self._buffer:
            if stop is not None and stop.is_set():
                return None
            try:
                chunk = self.conn.recv(65536)
            except socket.timeout:
                if stop is None:
                    return None
                continue
            if not chunk:
                return None  # the daemon closed the stream
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _read_message(self, stop: Optional[threading.Event]) -> Optional[dict]:
        line = self._read_line(stop)
        if line is None:
            return None
        try:
            message = json.loads(line)
        except ValueError:
            return {}
        return message if isinstance(message, dict) else {}

    def events(self, stop: Optional[threading.Event] = None) -> Iterator[Event]:
        """Events until the daemon stops or `stop` is set."""
        self.conn.settimeout(0.5 if stop is not None else None)
        while True:
            message = self._read_message(stop)
            if message is None:
                return
            if message.get("gputrace") == "dropped":
                self.dropped += int(message.get("count", 0))
                continue
            try:
                yield Event.from_json(message)
            except (KeyError, ValueError, TypeError):
                self.bad_lines += 1

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SubscriptionStream:
    """A running daemon's event stream, shaped as a sensor for the pipeline."""

    def __init__(self, subscription: Subscription, say: Callable[[str], None]) -> None:
        self.subscription = subscription
        self.say = say

    def start(self) -> None:
        pass  # attached already

    def events(self, stop: threading.Event) -> Iterator[Event]:
        yield from self.subscription.events(stop)
        if not stop.is_set():
            self.say("the daemon closed the stream")
            stop.set()

    def stats(self) -> dict[str, int]:
        return {"dropped_subscriber_queue": self.subscription.dropped,
                "unreadable_lines": self.subscription.bad_lines}

    def close(self) -> None:
        self.subscription.close()


def follow(subscription: Subscription, sinks: list[Sink], stop: threading.Event,
           say: Callable[[str], None]) -> Summary:
    """Feed the daemon's events to `sinks` until `stop` or the daemon ends; the
    daemon already enriched and explained every event, so there are no stages."""
    stream = SubscriptionStream(subscription, say)
    try:
        return Pipeline(sensor=stream, stages=[], sinks=sinks).run(stop)
    finally:
        stream.close()


def _how_to_join(socket_path: str) -> str:
    try:
        gid = os.stat(socket_path).st_gid
    except OSError:
        return "run as root, or ask for access to its directory"
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        name = str(gid)
    return "run as root" if gid == 0 else f"join group {name}, or run as root"


def attach(socket_path: str) -> Optional[Subscription]:
    """Connect to a running daemon; None when none listens at `socket_path`."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.settimeout(HELLO_TIMEOUT_S)
    try:
        conn.connect(socket_path)
    except OSError as exc:
        conn.close()
        if exc.errno in (errno_mod.ENOENT, errno_mod.ECONNREFUSED, errno_mod.ENOTDIR):
            return None
        if exc.errno in (errno_mod.EACCES, errno_mod.EPERM):
            raise NoPrivilege(f"a gputrace daemon is running but {socket_path} is not open to you "
                              f"({_how_to_join(socket_path)})") from None
        raise BadInput(f"cannot connect to {socket_path}: {exc.strerror}") from None
    try:
        return Subscription(conn, socket_path)
    except OSError as exc:
        conn.close()
        raise BadInput(f"cannot read from {socket_path}: {exc}") from None
