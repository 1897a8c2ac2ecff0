"""spec.transforms: every row through the backfill's JavaScript before any destination gets it.

The contract is docs/transforms.md's; in short, `transform(row)` returns the row to deliver,
null or undefined to drop it, or an array of rows; anything else fails the chunk for good.

A worker compiles the scripts once per sandbox process (beam_jobrunner.js_sandbox: V8 by
mini-racer, in child processes so that no script can end the worker; SANDBOXES of them, working
on batches in turn), and hands each batch of rows as one JSON array: one engine call per batch
of up to BATCH_ROWS rows, never one per row. What comes back is the batch's output rows as JSON text and where each came from, which
gives each its key: the input row's unique_id, and `<unique_id>#<n>` for the n-th element of an
array a transform returned (one `#<n>` per transform that returned an array). Every output
depends on its input row alone (the sandbox takes away the clock and seeds Math.random by the
row), so a rerun of a chunk produces the same rows, with the same keys, in the same order: the
webhook batches (cut at fixed offsets of the output rows) carry the same idempotency keys, and
Kafka's transaction per chunk stays exactly once.

Failures are the script's and permanent (exit 2): an error that names the transform, the
chunk, the row's unique_id, the JavaScript error and its line and column. Row contents are never
in them beyond what the script's own error message says.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from beam_contract.worker import Env
from beam_jobrunner import _rows
from beam_jobrunner.errors import PermanentError, excerpt

log = logging.getLogger("beam_jobrunner.transform")

DEFAULT_MEMORY_MIB = 256
DEFAULT_TIMEOUT_S = 10.0
# Rows per engine call. A batch's input and output live in the engine's heap at once: 4,096
# rows of the ERC20 table pass under a 16 MiB limit (24 MiB when each row becomes two), far
# below the default; between 1,000 and 16,384 rows the cost per row did not change measurably
# (docs/benchmarks.md, "Transforms").
BATCH_ROWS = 4096
# Sandbox processes per worker (BEAM_TRANSFORM_SANDBOXES): batches go to them in turn, so the
# engine's work runs beside the worker's and on more than one core (docs/benchmarks.md,
# "Transforms"). Each has its own memory limit.
SANDBOXES = 2
# Beyond the time limit, how long the worker waits for the sandbox to stop the script and say
# where it was, before it ends the sandbox process itself (a builtin V8 cannot interrupt).
KILL_GRACE_S = 10.0
STDERR_TAIL_BYTES = 4096
_HEADER = struct.Struct("<cQ")
_RUN_HEAD = struct.Struct("<QQ")
_OOM_MARK = b"out of memory"
_SHOWN_MESSAGE = 300  # characters of a script's error message in the worker's error


class TransformError(PermanentError):
    """A transform refused, threw, returned something that is not a row, or ran past a limit."""


@dataclass(frozen=True)
class Limits:
    """The operator's transform_memory_mib and transform_timeout_seconds, as the worker gets them."""

    memory_mib: int = DEFAULT_MEMORY_MIB
    timeout_s: float = DEFAULT_TIMEOUT_S
    batch_rows: int = BATCH_ROWS
    sandboxes: int = SANDBOXES

    @classmethod
    def from_env(cls) -> Limits:
        def number(name: str, default, kind):
            raw = os.environ.get(name) or ""
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                value = 0
            if value <= 0:
                raise PermanentError(f"configuration: {name} must be a positive number, got {raw!r}")
            return value

        return cls(
            memory_mib=number(Env.TRANSFORM_MEMORY_MIB, DEFAULT_MEMORY_MIB, int),
            timeout_s=number(Env.TRANSFORM_TIMEOUT_S, DEFAULT_TIMEOUT_S, float),
            batch_rows=number("BEAM_TRANSFORM_BATCH_ROWS", BATCH_ROWS, int),
            sandboxes=number("BEAM_TRANSFORM_SANDBOXES", SANDBOXES, int),
        )


def _sandbox_env() -> dict[str, str]:
    # Nothing of the worker's environment: no Secret's value can be read from the sandbox. The
    # allocator keeps the memory of one batch for the next instead of handing it back and
    # faulting it in again (a batch is a few MiB).
    return {
        "LANG": "C.UTF-8",
        "MALLOC_ARENA_MAX": "2",
        "MALLOC_MMAP_THRESHOLD_": str(64 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
        "MALLOC_TOP_PAD_": str(16 << 20),
    }


class _Reply:
    def __init__(self, op: bytes, body: memoryview) -> None:
        self.op, self.body = op, body

    def json(self) -> dict:
        return json.loads(bytes(self.body))


class EngineDied(Exception):
    """The sandbox process ended or stopped answering; .reason says which."""

    def __init__(self, reason: str, out_of_memory: bool = False, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.out_of_memory, self.timed_out = reason, out_of_memory, timed_out


class Sandbox:
    """One sandbox process (js_sandbox.py) and the frames to and from it."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-I",  # no PYTHON* variable, no user site, no current directory on the path
                "-B",  # writes no bytecode (it may write no file at all)
                "-m",
                "beam_jobrunner.js_sandbox",
                str(limits.memory_mib),
                repr(limits.timeout_s),
                str(os.getpid()),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_sandbox_env(),
            cwd="/",
            close_fds=True,
        )
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self._buf = bytearray(1 << 20)
        self._stderr = bytearray()
        self.out_of_memory = False
        self._drain = threading.Thread(target=self._read_stderr, name="js-sandbox-stderr", daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        # Kept, not logged: V8's last words (its heap statistics on an out-of-memory end) say
        # why the process ended; nothing the script prints ever gets here (console is a no-op).
        f = self.proc.stderr
        while chunk := f.read1(65536):
            self._stderr += chunk
            # V8's "Fatal JavaScript out of memory" comes before a long stack trace.
            self.out_of_memory = self.out_of_memory or _OOM_MARK in self._stderr.lower()
            del self._stderr[:-STDERR_TAIL_BYTES]

    def stderr_tail(self) -> str:
        self._drain.join(timeout=2)
        return self._stderr.decode("utf-8", "replace")

    def send(self, op: bytes, parts: Sequence) -> None:
        """Write one request (the sandbox reads it whole before it works on it)."""
        size = sum(len(p) for p in parts)
        try:
            self._write([_HEADER.pack(op, size), *parts])
        except (BrokenPipeError, ConnectionResetError):
            raise self._died() from None

    def receive(self, deadline: float) -> _Reply:
        """The answer to the request sent last; its body is valid until the next receive()."""
        head = self._read(_HEADER.size, deadline, into_buf=False)
        rop, rsize = _HEADER.unpack(head)
        if rsize > len(self._buf):
            self._buf = bytearray(rsize)
        body = self._read(rsize, deadline)
        return _Reply(rop, body)

    def _write(self, parts: Sequence) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            n = os.writev(self._in, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]

    def _read(self, size: int, deadline: float, into_buf: bool = True) -> memoryview:
        view = memoryview(self._buf)[:size] if into_buf else memoryview(bytearray(size))
        got = 0
        while got < size:
            # What is there is read whatever the time: the worker may come late for an answer
            # the sandbox gave in time (its encoding thread waits while the destination is slow).
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._out], [], [], max(left, 0))
            if not ready:
                if left <= 0:
                    self.kill()
                    raise EngineDied(
                        "it ran past the time limit and did not stop: its process was ended", timed_out=True
                    )
                continue
            n = os.readv(self._out, [view[got:]])
            if n == 0:
                raise self._died()
            got += n
        return view

    def _died(self) -> EngineDied:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        self.stderr_tail()  # waits for the drain to read everything
        oom = self.out_of_memory
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return EngineDied(f"its process ended ({how})", out_of_memory=oom)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=2)  # it ends when its stdin does
        except subprocess.TimeoutExpired:
            self.kill()
        self._drain.join(timeout=2)
        try:
            self.proc.stderr.close()
        except OSError:
            pass


def _key_text(key) -> str | None:
    if key is None:
        return None
    return key.decode("utf-8", "replace") if isinstance(key, bytes | bytearray) else str(key)


class Transformer:
    """A spec's transforms, compiled once in each of the worker's sandboxes, applied batch by batch.

    stream() keeps every sandbox busy: batch i goes to sandbox i mod N while the worker renders
    the next, and the answers are taken in order (Limits.sandboxes, 2 by default: a transform
    costs several times what rendering and sending a row do, and a worker Pod has no CPU limit).
    One thread uses a Transformer at a time (transport's encoding thread, one destination after
    the other)."""

    def __init__(self, scripts: Sequence[str], limits: Limits | None = None) -> None:
        self.scripts = list(scripts)
        self.limits = limits or Limits.from_env()
        self._boxes: list[Sandbox] = []
        self._lock = threading.Lock()
        self.v8_version = ""

    @classmethod
    def of(cls, transforms, limits: Limits | None = None) -> Transformer | None:
        """A Transformer for a spec's `transforms` (beam_contract.model.Transform), None if none."""
        if not transforms:
            return None
        return cls([t.script for t in transforms], limits)

    # --- life cycle ---------------------------------------------------------------------------
    def start(self) -> Transformer:
        """Start the sandboxes and compile every script in each: TransformError with the line if
        one does not compile, throws while it loads, or defines no transform."""
        with self._lock:
            self._start()
        return self

    def _start(self) -> list[Sandbox]:
        if self._boxes:
            return self._boxes
        t0 = time.monotonic()
        boxes = [Sandbox(self.limits) for _ in range(self.limits.sandboxes)]
        request = json.dumps({"scripts": self.scripts}).encode()
        try:
            for box in boxes:  # they compile at the same time
                box.send(b"C", [request])
            replies = [box.receive(time.monotonic() + self.limits.timeout_s * 2 + KILL_GRACE_S + 20) for box in boxes]
        except EngineDied as e:
            last = ""
            for box in boxes:
                box.kill()
                box.close()
                last = last or next((x for x in reversed(box.stderr_tail().splitlines()) if x.strip()), "")
            raise TransformError(
                f"transforms: the JavaScript engine could not start: {e.reason}"
                + (f": {excerpt(last)}" if last else "")
            ) from None
        for reply in replies:
            if reply.op != b"K":
                info = reply.json()
                for box in boxes:
                    box.close()
                raise TransformError(self._compile_error(info))
        self.v8_version = replies[0].json().get("v8", "")
        log.info(
            "transforms: %d compiled in %.2fs in %d sandboxes (V8 %s, memory limit %d MiB each, time limit %gs per "
            "batch of %d rows)",
            len(self.scripts),
            time.monotonic() - t0,
            len(boxes),
            self.v8_version,
            self.limits.memory_mib,
            self.limits.timeout_s,
            self.limits.batch_rows,
        )
        self._boxes = boxes
        return boxes

    @property
    def sandbox_pids(self) -> list[int]:
        """The sandbox processes' ids while they run (a benchmark's CPU accounting, tests)."""
        return [b.proc.pid for b in self._boxes]

    def close(self) -> None:
        with self._lock:
            for box in self._boxes:
                box.close()
            self._boxes = []

    def _discard(self) -> None:
        # After a failure an isolate may be in any state (past its memory limit, terminated), and
        # a sandbox may still be working on a batch: the next use starts and compiles afresh.
        for box in self._boxes:
            box.kill()
            box.close()
        self._boxes = []

    # --- applying -----------------------------------------------------------------------------
    def apply(self, array, keys: Sequence, *, chunk: int, first_row: int, as_bytes: bool) -> tuple[list, list, int]:
        """The rows of one batch after every transform: (values, keys, UTF-8 size of the values).

        array: the batch as one JSON array (bytes-like, UTF-8), its rows in chunk order; keys:
        their unique_id (str or bytes, None without one); first_row: the chunk's index of the
        first. With as_bytes, values are bytes-like _rows.Message (what the Kafka sink takes) and
        keys bytes; else both are str."""
        with self._lock:
            box = self._start()[0]
        try:
            box.send(b"R", [_RUN_HEAD.pack(chunk, first_row), array])
            return self._collect(
                box, keys, first_row, time.monotonic() + self.limits.timeout_s + KILL_GRACE_S, chunk, as_bytes
            )
        except EngineDied as e:
            self._discard()
            raise TransformError(self._died_error(e, keys, chunk, first_row)) from None
        except BaseException:
            self._discard()
            raise

    def stream(
        self, arrays: Iterable[tuple[object, Sequence]], *, chunk: int, as_bytes: bool, first_row: int = 0
    ) -> Iterator[tuple[list, list, int]]:
        """apply() to each (array, keys) of `arrays`, the chunk's batches in order, with every
        sandbox at work: the outputs in the same order."""
        with self._lock:
            boxes = self._start()
        pending: deque[tuple[Sandbox, Sequence, int, float]] = deque()
        first = first_row
        try:
            for i, (array, keys) in enumerate(arrays):
                if len(pending) == len(boxes):  # the oldest is the sandbox this batch goes to
                    yield self._collect(*pending.popleft(), chunk, as_bytes)
                box = boxes[i % len(boxes)]
                try:
                    box.send(b"R", [_RUN_HEAD.pack(chunk, first), array])
                except EngineDied as e:
                    raise TransformError(self._died_error(e, keys, chunk, first)) from None
                pending.append((box, keys, first, time.monotonic() + self.limits.timeout_s + KILL_GRACE_S))
                first += len(keys)
            while pending:
                yield self._collect(*pending.popleft(), chunk, as_bytes)
        except GeneratorExit:  # the consumer stopped early: what the sandboxes still work on is not wanted
            if pending:
                self._discard()
            raise
        except BaseException:  # a failed batch: the sandboxes start afresh if they are used again
            self._discard()
            raise

    def _collect(self, box: Sandbox, keys: Sequence, first: int, deadline: float, chunk: int, as_bytes: bool):
        try:
            reply = box.receive(deadline)
        except EngineDied as e:
            raise TransformError(self._died_error(e, keys, chunk, first)) from None
        if reply.op != b"K":
            raise TransformError(self._run_error(reply.json(), keys, chunk, first))
        return self._output(reply.body, keys, len(keys), chunk, as_bytes)

    def _output(self, body: memoryview, keys: Sequence, n: int, chunk: int, as_bytes: bool) -> tuple[list, list, int]:
        cut = body.obj.find(b"\n", 0, len(body))  # body: a view of the sandbox's reply buffer
        head, text = bytes(body[:cut]), body[cut + 1 :]
        # Messages over one copy of the text for the Kafka sink (as serialize makes them), str
        # for the others: no object of the text's size, no split copying it again.
        values = _rows.lines(text, not as_bytes)
        nbytes = max(len(text) - (len(values) - 1), 0)
        try:
            if head == b"*":
                out_keys = list(keys)
            elif not head:
                out_keys = []
            else:
                out_keys = self._keys(head.decode("ascii").split(","), keys, as_bytes)
        except (ValueError, IndexError):
            out_keys = None
        if out_keys is None or len(out_keys) != len(values) or (head == b"*" and len(values) != n):
            raise TransformError(
                f"transforms: the JavaScript engine answered chunk {chunk}'s batch with a malformed result "
                f"({len(values)} rows for {n}); was a built-in replaced by the script?"
            )
        return values, out_keys, nbytes

    @staticmethod
    def _keys(entries: list[str], keys: Sequence, as_bytes: bool) -> list:
        if not any("#" in e for e in entries):
            return [keys[int(e)] for e in entries]
        out = []
        for e in entries:
            index, sep, suffix = e.partition("#")
            key = keys[int(index)]
            if sep and key is not None:
                key = key + (b"#" + suffix.encode() if as_bytes else "#" + suffix)
            out.append(key)
        return out

    # --- errors -------------------------------------------------------------------------------
    def _which(self, k: int) -> str:
        return f"transform {k + 1} of {len(self.scripts)}" if k >= 0 else "a transform"

    @staticmethod
    def _row(keys: Sequence, i: int, first_row: int) -> str:
        key = _key_text(keys[i]) if 0 <= i < len(keys) else None
        if i < 0:
            return "an unknown row"
        return (
            f"row with unique_id {excerpt(key, 120)}"
            if key is not None
            else f"row {first_row + i} of the chunk (no unique_id)"
        )

    def _batch(self, keys: Sequence, first_row: int) -> str:
        if not keys:
            return "an empty batch"
        return f"the batch of {len(keys)} rows from {self._row(keys, 0, first_row)}"

    @staticmethod
    def _at(info: dict) -> str:
        line, column = info.get("line") or 0, info.get("column") or 0
        if not line:
            return " (no line and column: the script threw something that is not an Error)"
        where = f"line {line}, column {column}"
        other = info.get("in_transform")
        if other is not None and other != info.get("transform"):
            where += f" of transform {other + 1}"
        return f" at {where}"

    def _compile_error(self, info: dict) -> str:
        which = self._which(info.get("transform", -1))
        kind = info.get("kind")
        message = excerpt(info.get("message", ""), _SHOWN_MESSAGE)
        if kind == "compile":
            return f"transforms: {which} does not compile: {message}{self._at(info)}"
        if kind == "load":
            return f"transforms: {which} throws when it loads: {message}{self._at(info)}"
        if kind == "no_transform":
            return (
                f"transforms: {which} defines no function named transform: declare function transform(row) "
                "{ ...; return row; } (or const transform = (row) => ...) at the top of the script"
            )
        if kind == "timeout":
            return f"transforms: {which} ran past the time limit of {self.limits.timeout_s:g} s while it loaded"
        if kind == "memory":
            return f"transforms: {which} ran past the memory limit of {self.limits.memory_mib} MiB while it loaded"
        return f"transforms: {which} could not be loaded: {message}"

    def _run_error(self, info: dict, keys: Sequence, chunk: int, first_row: int) -> str:
        kind, k, i = info.get("kind"), info.get("transform", -1), info.get("row", -1)
        which, row = self._which(k), self._row(keys, i, first_row)
        message = excerpt(info.get("message", ""), _SHOWN_MESSAGE)
        if kind == "throw":
            return f"transforms: {which} threw on chunk {chunk}, {row}: {message}{self._at(info)}"
        if kind == "not_a_row":
            element = info.get("element", -1)
            what = (
                f"an array whose element {element} is {_a(info.get('returned', '?'))}"
                if element >= 0
                else _a(info.get("returned", "?"))
            )
            return (
                f"transforms: {which} returned {what} on chunk {chunk}, {row}: a transform returns the row (an "
                "object), null or undefined to drop it, or an array of rows"
            )
        if kind == "not_json":
            return f"transforms: {which} returned a row JSON cannot write on chunk {chunk}, {row}: {message}"
        if kind == "timeout":
            where = row if i >= 0 else self._batch(keys, first_row)
            return (
                f"transforms: {which} ran past the time limit of {self.limits.timeout_s:g} s per batch of up to "
                f"{self.limits.batch_rows} rows on chunk {chunk}, at {where}"
            )
        if kind == "memory":
            where = row if i >= 0 else self._batch(keys, first_row)
            return (
                f"transforms: {which} ran past the memory limit of {self.limits.memory_mib} MiB on chunk {chunk}, "
                f"at {where}"
            )
        return f"transforms: the JavaScript engine failed on chunk {chunk}, {self._batch(keys, first_row)}: {message}"

    def _died_error(self, e: EngineDied, keys: Sequence, chunk: int, first_row: int) -> str:
        batch = self._batch(keys, first_row)
        if e.timed_out:
            return (
                f"transforms: a transform ran past the time limit of {self.limits.timeout_s:g} s per batch on chunk "
                f"{chunk}, in {batch}, and V8 could not stop it: the engine's process was ended"
            )
        if e.out_of_memory:
            return (
                f"transforms: a transform ran past the memory limit of {self.limits.memory_mib} MiB on chunk {chunk}, "
                f"in {batch}: V8 ran out of memory and its process ended"
            )
        return f"transforms: the JavaScript engine's process ended on chunk {chunk}, in {batch} ({e.reason})"


def _a(kind: str) -> str:
    if kind in ("null", "undefined"):
        return kind
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


# --- one per worker process -----------------------------------------------------------------

_cached: tuple[tuple[str, ...], Transformer] | None = None
_cache_lock = threading.Lock()


def for_spec(spec) -> Transformer | None:
    """The worker's Transformer for spec.transforms, compiled on first use and kept for the
    process (every chunk and destination of a worker shares it), or None without transforms."""
    global _cached
    if not getattr(spec, "transforms", None):
        return None
    scripts = tuple(t.script for t in spec.transforms)
    with _cache_lock:
        if _cached is None or _cached[0] != scripts:
            if _cached is not None:
                _cached[1].close()
            _cached = (scripts, Transformer(scripts))
        return _cached[1]


@atexit.register
def _close_cached() -> None:
    if _cached is not None:
        _cached[1].close()


def check(spec) -> None:
    """Compile spec.transforms in a sandbox and stop it: the staging worker's check, before any
    row is staged. TransformError with the line if a script is refused."""
    if not getattr(spec, "transforms", None):
        return
    t = Transformer([x.script for x in spec.transforms], dataclasses.replace(Limits.from_env(), sandboxes=1))
    try:
        t.start()
    finally:
        t.close()


def transform_messages(transformer: Transformer | None, messages: Sequence[str]) -> list[str]:
    """What a backfill delivers for these messages (rows as docs/message-format.md writes them,
    in window order from the chunk's first row) after `transformer`'s scripts: a preview's
    sample. TransformError as in transport, naming chunk 0."""
    if transformer is None or not messages:
        return list(messages)
    keys = []
    for m in messages:
        k = json.loads(m).get("unique_id") if m.startswith("{") else None
        keys.append(None if k is None else str(k))
    array = ("[" + ",".join(messages) + "]").encode()
    values, _, _ = transformer.start().apply(array, keys, chunk=0, first_row=0, as_bytes=False)
    return [str(v) for v in values]


def transform_rows(transforms, rows: Sequence[dict], limits: Limits | None = None) -> list[dict]:
    """The rows a backfill with `transforms` would deliver for these rows (JSON objects as
    docs/message-format.md writes them), in order, in a sandbox started for the call."""
    t = Transformer.of(transforms, limits)
    if t is None:
        return list(rows)
    try:
        messages = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in rows]
        return [json.loads(v) for v in transform_messages(t, messages)]
    finally:
        t.close()
