"""Failures that carry the exit code of docs/worker-contract.md and a one-line reason."""

from __future__ import annotations

from beam_contract.worker import ExitCode


class JobError(Exception):
    """A failure the operator should see verbatim in the termination message."""

    exit_code = ExitCode.BUG

    def __init__(self, message: str) -> None:
        # The termination message is one line: a stack of reasons joined by newlines would be cut.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class PermanentError(JobError):
    """Bad input, 4xx, a missing table: retrying the Pod cannot help (exit 2)."""

    exit_code = ExitCode.PERMANENT


class TransientError(JobError):
    """A broker or endpoint stayed unreachable through our own retries (exit 3)."""

    exit_code = ExitCode.TRANSIENT
