"""SIGTERM: the Pod is being deleted (a cancel, a failed sibling index, an eviction, a drain).

The signal is taken by a thread of its own (sigwait), not by a Python handler: a handler runs
only when the main thread returns to the interpreter, and the main thread may be inside a
librdkafka call that blocks for many seconds. That thread runs what the open sinks registered
(the Kafka sink fences its transactional.id, which makes the coordinator abort the chunk's open
transaction at once instead of after the transaction timeout, so read_committed consumers of the
topic are not stalled), writes the termination message and exits 143 (128 + SIGTERM), well
inside the Pod's grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("beam_jobrunner.termination")

EXIT_CODE = 128 + signal.SIGTERM
# Each cleanup gets this long; all of them together stay well inside the default 30 s grace.
CLEANUP_TIMEOUT_S = 5.0

_cleanups: dict[int, tuple[str, Callable[[float], None]]] = {}
_lock = threading.Lock()


def install(on_exit: Callable[[str], None]) -> None:
    """Call before any other thread starts: threads inherit the signal mask, so SIGTERM then
    reaches only the waiting thread. `on_exit(message)` records why the worker stopped."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_wait, args=(on_exit,), name="sigterm", daemon=True).start()


@contextmanager
def on_termination(what: str, cleanup: Callable[[float], None]) -> Iterator[None]:
    """Run `cleanup(timeout_s)` if SIGTERM arrives while the block runs."""
    with _lock:
        token = id(cleanup)
        _cleanups[token] = (what, cleanup)
    try:
        yield
    finally:
        with _lock:
            _cleanups.pop(token, None)


def _wait(on_exit: Callable[[str], None]) -> None:
    signal.sigwait({signal.SIGTERM})
    with _lock:
        pending = list(_cleanups.values())
    log.warning("SIGTERM: the Pod is being deleted; %d open deliveries to close", len(pending))
    for what, cleanup in pending:
        try:
            cleanup(CLEANUP_TIMEOUT_S)
            log.warning("SIGTERM: %s", what)
        except Exception as e:  # the others must still run, and the worker must still exit
            log.error("SIGTERM: %s failed: %s", what, e)
    on_exit(f"terminated by SIGTERM (the Pod was deleted); {len(pending)} open deliveries closed")
    sys.stderr.flush()
    os._exit(EXIT_CODE)
