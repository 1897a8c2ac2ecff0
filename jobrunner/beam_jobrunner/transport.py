"""`beam-jobrunner transport`: worker JOB_COMPLETION_INDEX of BEAM_TRANSPORT_WORKERS delivers its
chunks (beam_contract.worker.worker_chunks), one after the other, each to every destination.

A Pod costs seconds to start; a chunk of 64 MiB about as much to send. One Pod per worker, not
per chunk, pays that cost once (docs/worker-contract.md, "How chunks are shared"). A chunk that
reached every destination gets a progress object (beam_contract.staging): the operator counts
those for chunks_left, and a replacement Pod skips those chunks without opening a sink.

Each chunk is downloaded once into a local file, the next one while the current one is sent. For each destination a reader thread decodes it
one row group at a time and renders each batch's JSON (serialize.py: polars and the _rows
extension, a few native calls per batch, the GIL released inside them), while the main thread hands the previous batch
to the sink, so the sink's own loop (librdkafka's produce) is the only per-row Python work.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from beam_contract import logs, staging
from beam_contract.worker import Env, worker_chunks
from beam_jobrunner import reach, seal, serialize, storage, transform
from beam_jobrunner.config import Common, env, require
from beam_jobrunner.errors import PermanentError, TransientError
from beam_jobrunner.sinks import Batch, Context, make_sink

log = logging.getLogger("beam_jobrunner.transport")

DEFAULT_BATCH_ROWS = 50_000
# The producer idles until the first batch is encoded; a small one ends that wait sooner.
FIRST_BATCH_ROWS = 4096


@dataclass
class LocalChunk:
    path: str
    num_rows: int

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _temp_prefix(tag: str) -> str:
    return f"beam-chunk-{tag}-" if tag else "beam-chunk-"


def remove_stale_downloads(tag: str) -> None:
    """Delete what an earlier attempt of this job's chunk left in TMPDIR when it was killed
    (a Pod's restarted container keeps its emptyDir volumes, TMPDIR among them)."""
    for stale in glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(_temp_prefix(tag)) + "*.parquet")):
        try:
            os.unlink(stale)
        except OSError:
            pass


def read_chunk(uri: str, tag: str = "", sealed_as: tuple[str, bytes] | None = None) -> LocalChunk:
    """Download a staged chunk into a temporary file (TMPDIR); close() deletes it. `sealed_as`:
    (its path in the backfill's prefix, the backfill's key) of a sealed chunk (seal.py), opened
    here; one that does not open was not staged by this backfill and fails for good."""
    fd, path = tempfile.mkstemp(prefix=_temp_prefix(tag), suffix=".parquet")
    os.close(fd)
    try:
        try:
            # Streamed by Arrow's C++ (GIL released), never held whole in Python memory.
            pafs.copy_files(
                storage.path_of(uri),
                path,
                source_filesystem=storage.filesystem(),
                destination_filesystem=pafs.LocalFileSystem(),
            )
        except FileNotFoundError:
            raise PermanentError(f"storage: {uri} does not exist") from None
        except OSError as e:
            raise TransientError(f"storage: cannot read {uri}: {e}") from None
        if sealed_as is not None:
            with open(path, "rb") as f:
                plain = seal.unseal(f.read(), *sealed_as)
            with open(path, "wb") as f:
                f.write(plain)
        return LocalChunk(path, pq.read_metadata(path).num_rows)
    except BaseException:
        os.unlink(path)
        raise


class ChunkDownload:
    """read_chunk() started in the background, so the download overlaps connecting to the
    destination (init_transactions, the delivery-marker lookup). result() waits for it."""

    def __init__(self, uri: str, tag: str = "", sealed_as: tuple[str, bytes] | None = None) -> None:
        self._result: LocalChunk | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(uri, tag, sealed_as), name="download", daemon=True)
        self._thread.start()

    def _run(self, uri: str, tag: str, sealed_as: tuple[str, bytes] | None) -> None:
        try:
            self._result = read_chunk(uri, tag, sealed_as)
        except BaseException as e:
            self._result = e

    def result(self) -> LocalChunk:
        self._thread.join()
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result

    def discard(self) -> None:
        """Wait for the download and delete the file; a failed download no longer matters."""
        self._thread.join()
        if isinstance(self._result, LocalChunk):
            self._result.close()


class EncodedBatches:
    """The chunk's encoded batches, produced ahead by a reader thread that starts at once.

    `local` is called in that thread (ChunkDownload.result), so the encoding starts as soon as
    the chunk is on disk, while the sink still connects (init_transactions, the delivery-marker
    lookup: 0.05-0.5 s against the local broker); the producer then finds `prefetch` batches
    ready. If the chunk turns out to be delivered already, close() throws them away.

    With as_bytes=True a Batch's values are read-only bytes-like _rows.Message objects and its
    keys bytes (for sinks that declare `takes_bytes`), else both are str. The thread does as
    little Python as it can: every return from C code must win the GIL back from the producing
    thread (see serialize.py).
    """

    _done = object()

    def __init__(
        self,
        local: Callable[[], LocalChunk],
        batch_rows: int,
        prefetch: int = 2,
        *,
        as_bytes: bool = False,
        transformer: transform.Transformer | None = None,
        chunk: int = 0,
    ) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self.rows_out = 0  # rows handed to the sink: the chunk's, or what its transforms made of them
        target = self._work if transformer is None else self._work_transformed
        args = (
            (local, batch_rows, as_bytes) if transformer is None else (local, batch_rows, as_bytes, transformer, chunk)
        )
        self._thread = threading.Thread(target=target, args=args, name="encode", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def _work(self, local: Callable[[], LocalChunk], batch_rows: int, as_bytes: bool) -> None:
        try:
            path = local().path
            encoded = serialize.parquet_batches(path, batch_rows, as_bytes=as_bytes, first_batch_rows=FIRST_BATCH_ROWS)
            try:
                first = 0
                for values, keys, nbytes in encoded:
                    if not self._put(Batch(values, keys, first, nbytes)):
                        return
                    first += len(values)
                    self.rows_out = first
            finally:
                encoded.close()  # in this thread, which owns the open parquet file
            self._put(self._done)
        except BaseException as e:  # handed to the consumer, which raises it in its own thread
            self._put(e)

    def _work_transformed(
        self,
        local: Callable[[], LocalChunk],
        batch_rows: int,
        as_bytes: bool,
        transformer: transform.Transformer,
        chunk: int,
    ) -> None:
        """_work() with spec.transforms: each batch goes to the JavaScript sandbox as one JSON
        array, and what comes back (fewer rows, more, other keys) is the sink's batch. Batches
        are the transforms' (transform.BATCH_ROWS): one engine call each."""
        try:
            path = local().path
            rows = min(batch_rows, transformer.limits.batch_rows)
            arrays = serialize.parquet_arrays(path, rows, as_bytes=as_bytes, first_batch_rows=FIRST_BATCH_ROWS)
            out = transformer.stream(arrays, chunk=chunk, as_bytes=as_bytes)
            try:
                first_out = 0
                for values, keys, nbytes in out:
                    if values and not self._put(Batch(values, keys, first_out, nbytes)):
                        return
                    first_out += len(values)
                    self.rows_out = first_out
            finally:
                out.close()  # in this thread, which owns the open parquet file and the sandboxes' pipes
                arrays.close()
            self._put(self._done)
        except BaseException as e:
            self._put(e)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self._q.get()
            if item is self._done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        # Join the reader: a daemon thread still inside polars or parquet code while the
        # interpreter shuts down aborts the process (C++ terminate), losing the exit code.
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.1)
            except queue.Empty:
                pass


def deliver_chunk(
    sink, download: ChunkDownload, batch_rows: int, transformer: transform.Transformer | None = None
) -> int | None:
    """Open the sink and deliver the chunk to it (through the spec's transforms, if any): the
    bytes sent, or None if it already was. The caller closes the sink."""
    batches = EncodedBatches(
        download.result,
        batch_rows,
        as_bytes=getattr(sink, "takes_bytes", False),
        transformer=transformer,
        chunk=sink.ctx.chunk,
    )
    try:
        sink.open()
        if sink.already_delivered():
            return None
        sent = sink.deliver(batches)
        sink.rows_out = batches.rows_out
        return sent
    finally:
        batches.close()


def _metrics():
    port = env("BEAM_METRICS_PORT")
    if port is None:
        return None
    from prometheus_client import Counter, start_http_server

    start_http_server(int(port))
    return (
        Counter("beam_rows_delivered", "Rows delivered", ["destination"]),
        Counter("beam_bytes_delivered", "Bytes of JSON delivered", ["destination"]),
    )


# How often a worker started with staging (Env.AWAIT_MANIFEST) looks for the manifest: often at
# first, when staging is short and every second shows; less often for a long staging.
MANIFEST_POLL_S, MANIFEST_POLL_SLOW_S, MANIFEST_POLL_FAST_FOR_S = 0.2, 2.0, 60.0


def await_manifest(uri: str) -> dict:
    """The manifest, once staging has written it. Staging writes it last, and a retried staging
    Pod keeps the one an earlier Pod wrote, so the first manifest seen is the one to deliver."""
    t0 = time.monotonic()
    if not storage.exists(uri):
        log.info("waiting for the manifest %s: staging still runs", uri)
    while not storage.exists(uri):
        waited = time.monotonic() - t0
        time.sleep(MANIFEST_POLL_S if waited < MANIFEST_POLL_FAST_FOR_S else MANIFEST_POLL_SLOW_S)
    log.info("manifest found after %.1fs of staging", time.monotonic() - t0)
    return storage.read_json(uri)


def delivered_chunks(staging_uri: str, k: bytes | None = None) -> set[int]:
    """Chunks an earlier Pod (of any attempt) delivered to every destination: skipped whole.
    With the backfill's key, only progress objects it signed count: one another organization's
    Pod wrote there must not make a chunk skipped."""
    done = set()
    for uri, _ in storage.list_files(staging.progress_prefix(staging_uri)):
        chunk = staging.chunk_of_progress(uri)
        if chunk is None:
            continue
        if k is not None and not seal.verified(storage.read_json(uri), k):
            log.warning(
                "progress object %s is not signed with this backfill's key: chunk %d is delivered again", uri, chunk
            )
            continue
        done.add(chunk)
    return done


def _deliver_to_each(common: Common, index: int, download: ChunkDownload, batch_rows: int, metrics) -> list[dict]:
    """One chunk to every destination of the spec, in order: a result per destination."""
    results = []
    transformer = transform.for_spec(common.spec)
    for dest_index, dest in enumerate(common.spec.destinations):
        ctx = Context(
            job_id=common.job_id,
            chunk=index,
            dest_index=dest_index,
            staging_uri=common.staging_uri,
            connect_timeout=common.connect_timeout,
            namespace=common.namespace,
        )
        sink = make_sink(dest, ctx)
        t0 = time.monotonic()
        with reach.destination(sink.label):
            try:
                nbytes = deliver_chunk(sink, download, batch_rows, transformer)
            except reach.Refused as r:
                raise r.error from None
            except Exception:
                # A library that wrapped or swallowed the refusal still failed because of it.
                refused = reach.refused()
                if refused is not None:
                    raise refused from None
                raise
            finally:
                sink.close()
        if nbytes is None:
            log.info("%s: already delivered, skipped", sink.label)
            results.append({"destination": dest.name, "type": dest.type, "rows": 0, "bytes": 0, "skipped": True})
            continue
        elapsed = time.monotonic() - t0
        rows = download.result().num_rows
        log.info(
            "%s: delivered %d rows%s, %d bytes in %.2fs (%.0f rows/s)",
            sink.label,
            rows,
            f" as {sink.rows_out} messages after the transforms" if transformer is not None else "",
            nbytes,
            elapsed,
            rows / elapsed if elapsed else 0,
        )
        if metrics:
            metrics[0].labels(dest.name).inc(rows)
            metrics[1].labels(dest.name).inc(nbytes)
        result = {"destination": dest.name, "type": dest.type, "rows": rows, "bytes": nbytes, "seconds": elapsed}
        if transformer is not None:
            result["messages"] = sink.rows_out
        results.append(result)
    return results


def run(common: Common) -> dict:
    worker = int(require(Env.COMPLETION_INDEX))
    manifest_uri = env(Env.MANIFEST_URI) or staging.manifest_uri(common.staging_uri)
    if env(Env.AWAIT_MANIFEST) == "true":
        manifest = await_manifest(manifest_uri)
    else:
        manifest = storage.read_json(manifest_uri)
    k = seal.key()
    if k is not None and not seal.verified(manifest, k):
        raise PermanentError(
            f"storage: the manifest {manifest_uri} was not written by this backfill's staging worker (replaced or "
            "changed by someone without its key); retry the backfill to stage it again"
        )
    sealed = k is not None and manifest.get("sealed") is True
    chunks = manifest.get("chunks", [])
    # Without the variable, one worker per chunk (the Jobs of earlier releases).
    workers = int(env(Env.TRANSPORT_WORKERS) or max(len(chunks), worker + 1))
    if not 0 <= worker < workers:
        raise PermanentError(f"transport: worker {worker} is not one of {workers} ({Env.TRANSPORT_WORKERS})")
    mine = list(worker_chunks(worker, workers, len(chunks)))
    batch_rows = int(env("BEAM_TRANSPORT_BATCH_ROWS", str(DEFAULT_BATCH_ROWS)))
    metrics = _metrics()
    # From here on no Python socket of this process connects inward unless allowed (reach.py).
    reach.install(reach.Policy.from_env())
    done = delivered_chunks(common.staging_uri, k) if mine else set()
    todo = [c for c in mine if c not in done]
    log.info(
        "worker %d of %d: chunks %s of %d; %d delivered by an earlier Pod, %d to deliver",
        worker,
        workers,
        _ranges(mine),
        len(chunks),
        len(mine) - len(todo),
        len(todo),
    )
    transformer = transform.for_spec(common.spec)
    if transformer is not None and todo:
        transformer.start()  # a script that does not compile fails the worker before any row moves
    totals: dict[int, dict] = {}
    rows_staged = 0
    downloads: dict[int, ChunkDownload] = {}

    def download(i: int) -> ChunkDownload:
        if i not in downloads:
            tag = f"{common.job_id}-{i}"
            remove_stale_downloads(tag)
            uri = chunks[i]["uri"]
            where = (uri.removeprefix(common.staging_uri), k) if sealed and k is not None else None
            downloads[i] = ChunkDownload(uri, tag, where)
        return downloads[i]

    try:
        for n, index in enumerate(todo):
            current = download(index)
            t0 = time.monotonic()
            try:
                with logs.backfill_context(chunk=index):
                    if n + 1 < len(todo):
                        download(todo[n + 1])  # downloads while this one is sent: one file ahead
                    results = _deliver_to_each(common, index, current, batch_rows, metrics)
                    rows = chunks[index].get("rows")
                    progress = {"chunk": index, "worker": worker, "rows": rows, "time": _now()}
                    storage.write_json(
                        staging.progress_uri(common.staging_uri, index),
                        seal.sign(progress, k) if k is not None else progress,
                        # The operator sums these from one listing, without reading each object.
                        staging.progress_metadata(rows),
                    )
            except Exception as e:
                # The termination message names the chunk (beam_contract.worker.failure_message).
                with contextlib.suppress(AttributeError):
                    e.chunk = index
                raise
            finally:
                downloads.pop(index).discard()
            rows_staged += chunks[index].get("rows") or 0
            for dest_index, r in enumerate(results):
                t = totals.setdefault(
                    dest_index,
                    {
                        "destination": r["destination"],
                        "type": r["type"],
                        "rows": 0,
                        "bytes": 0,
                        "chunks": 0,
                        "skipped": 0,
                    }
                    | {"seconds": 0.0},
                )
                t["rows"] += r["rows"]
                if "messages" in r:
                    t["messages"] = t.get("messages", 0) + r["messages"]
                t["bytes"] += r["bytes"]
                t["skipped" if r.get("skipped") else "chunks"] += 1
                t["seconds"] += r.get("seconds", 0.0)
            log.info(
                "chunk %d delivered to every destination in %.2fs (%d of %d of this worker)",
                index,
                time.monotonic() - t0,
                n + 1,
                len(todo),
            )
    finally:
        for d in downloads.values():
            d.discard()
    for t in totals.values():
        t["seconds"] = round(t["seconds"], 3)
    return {
        "worker": worker,
        "workers": workers,
        "chunks": len(todo),
        "skipped": len(mine) - len(todo),
        "rows": rows_staged,
        "destinations": list(totals.values()),
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _ranges(indexes: list[int]) -> str:
    """[0, 2, 4] -> "0,2,4"; long lists are cut, the log line must stay short."""
    shown = ",".join(map(str, indexes[:10]))
    return shown + (f",... ({len(indexes)})" if len(indexes) > 10 else "") if indexes else "none"
