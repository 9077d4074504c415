"""Streams events as JSON lines to local subscribers over a Unix socket.

Access is the socket file's: owner root, group `gputrace`, mode 0660.  Where
that group does not exist (the sysusers snippet creates it) the socket is
root-only, 0600, and the daemon says so.  Each subscriber has a bounded queue
and its own writer thread, so a slow reader never stalls the pipeline: what
does not fit is dropped, counted, and announced to that subscriber with a
``{"gputrace": "dropped", "count": N}`` line before its next event.

The first line a subscriber reads is ``{"gputrace": "hello", "version": 1, ...}``.
"""

from __future__ import annotations

import grp
import json
import os
import queue
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from tracer.errors import EnvironmentProblem
from tracer.event import Event

PROTOCOL_VERSION = 1
MAX_SUBSCRIBERS = 64


def socket_group(name: str) -> Optional[int]:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class _Subscriber:
    def __init__(self, conn: socket.socket, capacity: int, on_drop: Callable[[int], None]) -> None:
        self.conn = conn
        self.queue: "queue.Queue[Optional[bytes]]" = queue.Queue(capacity)
        self.on_drop = on_drop
        self.dropped = 0          # drops not yet announced to this subscriber
        self.dropped_total = 0
        self.alive = True
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._write_loop, name="subscriber", daemon=True)

    def offer(self, line: bytes) -> None:
        try:
            self.queue.put_nowait(line)
        except queue.Full:
            with self._lock:
                self.dropped += 1
                self.dropped_total += 1
            self.on_drop(1)

    def _write_loop(self) -> None:
        try:
            while True:
                line = self.queue.get()
                if line is None:
                    return
                with self._lock:
                    dropped, self.dropped = self.dropped, 0
                if dropped:
                    notice = {"gputrace": "dropped", "count": dropped}
                    self.conn.sendall((json.dumps(notice) + "\n").encode())
                self.conn.sendall(line)
        except OSError:
            pass  # the subscriber went away
        finally:
            self.alive = False
            try:
                self.conn.close()
            except OSError:
                pass

    def finish(self, timeout: float) -> None:
        """Let the writer send what is queued, then close."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout)
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@dataclass
class SubscriptionSink:
    path: str
    group: str = "gputrace"
    subscriber_buffer: int = 1024
    on_drop: Callable[[int], None] = lambda n: None      # events a slow subscriber lost
    say: Callable[[str], None] = lambda msg: None
    subscribers: list[_Subscriber] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._closing = False
        self.mode = 0o600
        self.server = self._bind()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="socket-accept",
                                               daemon=True)
        self._accept_thread.start()

    def _bind(self) -> socket.socket:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        try:
            os.unlink(self.path)  # stale from a killed daemon; the daemon lock says we own it
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # never world-accessible, not even for an instant
        try:
            server.bind(self.path)
        except OSError as exc:
            server.close()
            raise EnvironmentProblem(f"cannot create the socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        gid = socket_group(self.group)
        if gid is None:
            self.say(f"group '{self.group}' does not exist: socket {self.path} is root-only (0600)")
        else:
            os.chown(self.path, 0, gid)
            os.chmod(self.path, 0o660)
            self.mode = 0o660
        server.listen(16)
        return server

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.subscribers = [s for s in self.subscribers if s.alive]
                if len(self.subscribers) >= MAX_SUBSCRIBERS or self._closing:
                    conn.close()
                    continue
                sub = _Subscriber(conn, self.subscriber_buffer, self.on_drop)
                hello = {"gputrace": "hello", "version": PROTOCOL_VERSION, "pid": os.getpid()}
                sub.offer((json.dumps(hello) + "\n").encode())
                self.subscribers.append(sub)
            sub.thread.start()

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return sum(1 for s in self.subscribers if s.alive)

    def consume(self, event: Event) -> None:
        with self._lock:
            targets = [s for s in self.subscribers if s.alive]
        if not targets:
            return
        line = (json.dumps(event.to_json(), separators=(",", ":")) + "\n").encode("utf-8")
        for sub in targets:
            sub.offer(line)

    def close(self, flush_timeout: float = 2.0) -> None:
        self._closing = True
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        with self._lock:
            subs = list(self.subscribers)
        for sub in subs:
            sub.finish(flush_timeout)
        self._accept_thread.join(2)
