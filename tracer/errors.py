"""Errors a user sees as one line, and the exit codes they map to."""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    SUCCESS = 0
    ERROR = 1            # anything unexpected (still printed as one line)
    USAGE = 2            # bad command line (click's own code)
    NO_PRIVILEGE = 3     # not root / missing CAP_BPF+CAP_PERFMON
    ENVIRONMENT = 4      # no BTF, no kernel headers, no tracefs, BPF load failure
    BAD_INPUT = 5        # unreadable or malformed input file or config
    ALREADY_RUNNING = 6  # another daemon holds the lock
    INTERRUPTED = 130


class GputraceError(Exception):
    """An error with a one-line message for the user and an exit status."""

    status = ExitStatus.ERROR

    def __init__(self, message: str, status: "ExitStatus | None" = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class NoPrivilege(GputraceError):
    status = ExitStatus.NO_PRIVILEGE


class EnvironmentProblem(GputraceError):
    status = ExitStatus.ENVIRONMENT


class BadInput(GputraceError):
    status = ExitStatus.BAD_INPUT
