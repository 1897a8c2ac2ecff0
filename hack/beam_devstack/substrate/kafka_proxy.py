"""A TCP proxy in front of the stack's broker that can hold back one kind of Kafka request.

Fault tests use it to stop a worker at an exact, observable point without touching the worker:
holding EndTxn (the commit) leaves a chunk's rows in an open transaction for as long as the test
needs, as a broker that stops answering would. A held request is never sent on: when the hold
ends its connection is cut, as if the broker had died mid-request (a live client reconnects and
retries; a killed one's commit never arrives). The broker advertises a second listener at the
proxy's port (beam_devstack.substrate.kafka), so every connection a client makes after
bootstrapping goes through it too.

Only the request framing is read (a 4-byte size, then the 2-byte api key); everything else is
forwarded byte for byte, in both directions.
"""

from __future__ import annotations

import socket
import struct
import threading
from contextlib import contextmanager

END_TXN = 26  # Kafka's api key of the transaction commit/abort request


class KafkaProxy:
    def __init__(self, upstream_port: int, port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.port = port
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._held_key: int | None = None
        self._release = threading.Event()
        self._held = 0  # requests of the held kind waiting now
        self._let_through = 0  # requests of the held kind still to send on (holding(after=))
        self._txn_prefix: str | None = None  # holding(transactional_id=)
        self._held_changed = threading.Condition()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="kafka-proxy", daemon=True).start()

    @property
    def bootstrap(self) -> str:
        return f"{self.upstream[0]}:{self.port}"

    @contextmanager
    def holding(self, api_key: int = END_TXN, after: int = 0, transactional_id: str | None = None):
        """Requests of `api_key` are held until the block ends; then their connections are cut.
        The first `after` of them go through: a worker that delivers several chunks commits that
        many before it stops at the next commit. With `transactional_id` (an EndTxn's prefix,
        such as `beam-<job_id>-`), only that backfill's commits count: a worker an earlier test
        left behind (its namespace is deleted in the background) commits undisturbed."""
        self._release.clear()
        with self._held_changed:
            self._let_through = after
        self._txn_prefix = transactional_id
        self._held_key = api_key
        try:
            yield self
        finally:
            self._held_key = None
            self._release.set()

    def _concerns(self, frame: bytes) -> bool:
        prefix = self._txn_prefix
        return prefix is None or (end_txn_transactional_id(frame) or "").startswith(prefix)

    def _passes(self) -> bool:
        with self._held_changed:
            if self._let_through > 0:
                self._let_through -= 1
                return True
            return False

    def wait_held(self, n: int = 1, timeout: float = 60.0) -> bool:
        """Whether `n` requests of the held kind arrived (each from a client now stuck on it)."""
        with self._held_changed:
            return self._held_changed.wait_for(lambda: self._held >= n, timeout)

    def close(self) -> None:
        self._release.set()
        self._listener.close()
        with self._lock:
            for c in self._conns:
                c.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                broker = socket.create_connection(self.upstream, timeout=10)
                broker.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, broker]
            threading.Thread(target=self._requests, args=(client, broker), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client), daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                head = _read(src, 6)
                size, api_key = struct.unpack(">ih", head)
                frame = head + _read(src, size - 2)
                if (
                    self._held_key is not None
                    and api_key == self._held_key
                    and self._concerns(frame)
                    and not self._passes()
                ):
                    with self._held_changed:
                        self._held += 1
                        self._held_changed.notify_all()
                    self._release.wait()
                    with self._held_changed:
                        self._held -= 1
                    return  # the finally cuts both sides: the held request is not sent
                dst.sendall(frame)
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def end_txn_transactional_id(frame: bytes) -> str | None:
    """The transactional.id an EndTxn request is for, from its framing (size, then the request
    header and body of Kafka's protocol): versions 0-2 use plain strings, 3 and later the
    flexible encoding (compact strings, tagged fields after the header)."""
    try:
        api_key, version = struct.unpack(">hh", frame[4:8])
        pos = 12  # size, api key, version, correlation id
        (client_len,) = struct.unpack(">h", frame[pos : pos + 2])
        pos += 2 + max(client_len, 0)
        if version >= 3:
            tags, pos = _uvarint(frame, pos)
            for _ in range(tags):
                _, pos = _uvarint(frame, pos)
                size, pos = _uvarint(frame, pos)
                pos += size
            n, pos = _uvarint(frame, pos)
            n -= 1
        else:
            (n,) = struct.unpack(">h", frame[pos : pos + 2])
            pos += 2
        return frame[pos : pos + n].decode() if n >= 0 else None
    except (struct.error, IndexError, UnicodeDecodeError):
        return None


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("closed")
        buf += chunk
    return bytes(buf)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
