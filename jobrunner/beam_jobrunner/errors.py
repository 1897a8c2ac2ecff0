"""Failures that carry the exit code of docs/worker-contract.md and a one-line reason."""

from __future__ import annotations

from beam_contract.worker import ExitCode


class JobError(Exception):
    """A failure the operator should see verbatim in the termination message."""

    exit_code = ExitCode.BUG
    # The chunk a transport worker was delivering when it failed: its termination message names it.
    chunk: int | None = None

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


EXCERPT_CHARS = 200


def excerpt(text: str | bytes | None, limit: int = EXCERPT_CHARS) -> str:
    """A remote answer as an error message may quote it: control characters and newlines
    collapsed to single spaces, at most `limit` characters, and marked when cut. An endpoint's
    answer is not ours to copy whole into a status others read (it may be an internal service's
    page, or carry secrets), nor long enough to crowd out the reason."""
    from beam_jobrunner.log_tail import cut, mask

    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    # Masked before anything is collapsed or cut, so that no form of a secret survives either.
    clean = " ".join("".join(c if c.isprintable() else " " for c in mask(text)).split())
    if len(clean) <= limit:
        return mask(clean)
    return f"{cut(clean, limit)}... [truncated to {limit} characters]"
