"""`beam-jobrunner stage`: export one window of a Snowflake table to parquet chunks in GCS.

Two strategies, one result (chunks under <staging>/chunks/ and <staging>/manifest.json):
- unload: Snowflake writes the parquet files itself (COPY INTO @stage); production default.
- fetch: the worker runs the same SELECT with bound parameters, streams Arrow batches and
  writes zstd parquet chunks of about BEAM_CHUNK_TARGET_BYTES. The dev stack and the tests use
  it because fakesnow cannot unload.
Column names are lower-cased in the chunks (Snowflake reports unquoted names upper-cased); the
message format uses the names users see in the docs.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from beam_contract import staging
from beam_contract.worker import (
    SNOWFLAKE_REQUIRED_KEYS,
    SNOWFLAKE_SECRET_KEYS,
    Env,
    StageStrategy,
    StagingResult,
    snowflake_env,
)
from beam_jobrunner import seal, sql, storage, termination, transform
from beam_jobrunner.config import DEFAULT_CHUNK_TARGET_BYTES, Common, env
from beam_jobrunner.errors import JobError, PermanentError, TransientError

log = logging.getLogger("beam_jobrunner.stage")
UNLOAD_POLL_S = 0.5  # how often a running unload is asked for its status

ROW_GROUP_ROWS = 65536  # BEAM_CHUNK_ROW_GROUP_ROWS overrides: a chunk is cut only between row groups
# Snowflake's error for "no such object or no privilege on it" (same code in fakesnow).
SF_OBJECT_MISSING = 2003


def snowflake_connect(timeout: float):
    # The connector probes cloud metadata endpoints at login to report the platform it runs on
    # (telemetry only); inside a Pod those probes wait for their timeouts (docs/benchmarks.md).
    os.environ.setdefault("SNOWFLAKE_DISABLE_PLATFORM_DETECTION", "true")
    import snowflake.connector

    params = {
        "paramstyle": "qmark",
        "login_timeout": timeout,
        "network_timeout": max(timeout, 60),
        # The window's bounds are naive UTC timestamps (the model's contract). Compared with a
        # TIMESTAMP_LTZ or _TZ column they are read in the session's time zone, which is the
        # account's (often America/Los_Angeles): the window would shift by hours.
        "session_parameters": {"TIMEZONE": "UTC"},
    }
    for key in SNOWFLAKE_SECRET_KEYS:
        value = env(snowflake_env(key))
        if value is not None:
            params[key] = int(value) if key == "port" else value
    for key in SNOWFLAKE_REQUIRED_KEYS:
        if key not in params:
            raise PermanentError(
                f"staging: Snowflake {key} missing (env {snowflake_env(key)} from the Snowflake Secret)"
            )
    try:
        return snowflake.connector.connect(**params)
    except snowflake.connector.errors.DatabaseError as e:
        where = params.get("host") or f"account {params['account']}"
        # The connector's messages name the account and user, never the password.
        raise TransientError(
            f"staging: cannot connect to Snowflake at {where} within {timeout:.0f}s: {_one_line(e)}"
        ) from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500]


def _query_error(e: Exception, table: str) -> JobError:
    import snowflake.connector

    if isinstance(e, snowflake.connector.errors.ProgrammingError):
        if getattr(e, "errno", None) == SF_OBJECT_MISSING:
            return PermanentError(f"staging: table {table} does not exist or is not authorized")
        return PermanentError(f"staging: query on {table} failed: {_one_line(e)}")
    return TransientError(f"staging: query on {table} failed: {_one_line(e)}")


def _clear(staging_uri: str) -> None:
    # A retried stage Pod must not leave the previous Pod's chunks beside its own.
    for uri, _ in storage.list_files(staging.join(staging_uri, staging.CHUNKS) + "/"):
        storage.filesystem().delete_file(storage.path_of(uri))


def _normalize(table: pa.Table) -> pa.Table:
    # Lower-case names; drop the connector's per-field metadata (it would be copied into every file).
    fields = [pa.field(f.name.lower(), f.type, f.nullable) for f in table.schema]
    return pa.Table.from_arrays(table.columns, schema=pa.schema(fields))


class ChunkWriter:
    """Writes row groups into in-memory parquet and uploads a chunk once it reaches the target size."""

    def __init__(self, staging_uri: str, target_bytes: int, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.staging_uri = staging_uri
        self.target = target_bytes
        self.row_group_rows = row_group_rows
        self.chunks: list[dict] = []
        self.schema: pa.Schema | None = None
        self._sink: pa.BufferOutputStream | None = None
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        self._key = seal.key()

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            table = table.cast(self.schema)
        for batch in table.to_batches(max_chunksize=self.row_group_rows):
            if batch.num_rows == 0:
                continue
            if self._writer is None:
                self._sink = pa.BufferOutputStream()
                self._writer = pq.ParquetWriter(self._sink, self.schema, compression="zstd")
            self._writer.write_batch(batch, row_group_size=self.row_group_rows)
            self._rows += batch.num_rows
            if self._sink.tell() >= self.target:
                self._finish()

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        data = self._sink.getvalue().to_pybytes()
        uri = staging.chunk_uri(self.staging_uri, len(self.chunks))
        if self._key is not None:
            data = seal.seal(data, uri.removeprefix(self.staging_uri), self._key)
        storage.write_bytes(uri, data)
        self.chunks.append({"index": len(self.chunks), "uri": uri, "rows": self._rows, "bytes": len(data)})
        log.info("staged chunk %d: %d rows, %d bytes -> %s", len(self.chunks) - 1, self._rows, len(data), uri)
        self._writer, self._sink, self._rows = None, None, 0

    def close(self) -> list[dict]:
        self._finish()
        return self.chunks


def stage_fetch(common: Common, conn, target_bytes: int) -> list[dict]:
    q = sql.select_query(common.spec)
    log.info("fetch: %s (%d parameters)", q.sql[:300], len(q.params))
    cur = conn.cursor()
    try:
        t0 = time.monotonic()
        cur.execute(q.sql, q.params)
        log.info("fetch: Snowflake answered in %.2fs", time.monotonic() - t0)
        writer = ChunkWriter(
            common.staging_uri, target_bytes, int(env("BEAM_CHUNK_ROW_GROUP_ROWS", str(ROW_GROUP_ROWS)))
        )
        for table in cur.fetch_arrow_batches():
            writer.write(_normalize(table))
        return writer.close()
    except JobError:
        raise
    except Exception as e:
        raise _query_error(e, common.spec.table) from None
    finally:
        cur.close()


def stage_unload(common: Common, conn, target_bytes: int) -> list[dict]:
    stage = env(Env.UNLOAD_STAGE)
    if stage is None:
        raise PermanentError(
            f"staging: strategy unload needs {Env.UNLOAD_STAGE} (the external stage over the staging bucket)"
        )
    # The stage's URL is the staging root; the job's files go under <namespace>/<job_id>/chunks/,
    # each attempt under a folder of its own: a query an earlier Pod left running (its cancel
    # lost with it) may still write files, and its files must not be listed as this attempt's.
    attempt = secrets.token_hex(6)
    path = f"{staging.job_path(common.namespace, common.job_id)}/{staging.CHUNKS}/{attempt}"
    cur = conn.cursor()
    try:
        # Asynchronously, so that the query has an id to cancel: on SIGTERM (a cancel, a delete,
        # a suspend) Snowflake stops writing files instead of finishing the COPY on its own.
        cur.execute_async(sql.unload_sql(common.spec, stage, path, target_bytes))
        query_id = cur.sfqid

        def cancel(timeout: float) -> None:
            conn.cursor().execute(sql.cancel_sql(query_id), timeout=max(1, int(timeout)))

        with termination.on_termination(f"cancelled the unload query {query_id}", cancel):
            log.info("unloading (query %s) to %s", query_id, path)
            while conn.is_still_running(conn.get_query_status_throw_if_error(query_id)):
                time.sleep(UNLOAD_POLL_S)
        cur.get_results_from_sfqid(query_id)
        listed = cur.execute(sql.list_sql(stage, path)).fetchall()
    except JobError:
        raise
    except Exception as e:
        raise _query_error(e, common.spec.table) from None
    finally:
        cur.close()
    return chunks_from_listing(common.staging_uri, [(row[0], int(row[1])) for row in listed])


def chunks_from_listing(staging_uri: str, listing: list[tuple[str, int]]) -> list[dict]:
    """Manifest entries for the files Snowflake unloaded (LIST gives name and size; rows from footers)."""
    chunks = []
    for name, size in sorted(listing):
        marker = f"/{staging.CHUNKS}/"
        if marker not in name or not name.endswith(".parquet"):
            continue
        uri = staging.join(staging_uri, staging.CHUNKS, name.split(marker, 1)[1])
        with storage.filesystem().open_input_file(storage.path_of(uri)) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        if rows:
            chunks.append({"index": len(chunks), "uri": uri, "rows": rows, "bytes": size})
    return chunks


def run(common: Common) -> dict:
    try:
        strategy = StageStrategy(env(Env.STAGE_STRATEGY, StageStrategy.UNLOAD))
    except ValueError:
        choices = " or ".join(StageStrategy)
        raise PermanentError(f"staging: unknown {Env.STAGE_STRATEGY} {env(Env.STAGE_STRATEGY)!r} ({choices})") from None
    target = int(env(Env.CHUNK_TARGET_BYTES, str(DEFAULT_CHUNK_TARGET_BYTES)))
    sql.table_name(common.spec.table)  # refuse a bad name before connecting anywhere
    k = seal.key()  # and a bad key
    # and a transform that does not compile or defines no transform (docs/transforms.md): the
    # earliest place with a JavaScript engine, before any row is staged
    transform.check(common.spec)
    t0 = time.monotonic()
    uri = staging.manifest_uri(common.staging_uri)
    if storage.exists(uri):
        # The manifest is written last: an earlier Pod of this backfill finished staging and
        # died before it could report (or its report was lost). Transport workers may be reading
        # those chunks already (they start with staging), so they stay as they are.
        manifest = storage.read_json(uri)
        if k is None or seal.verified(manifest, k):
            log.info(
                "staged already by an earlier Pod: %d rows in %d chunks", manifest["num_rows"], manifest["num_chunks"]
            )
            return StagingResult(
                num_chunks=manifest["num_chunks"], num_rows=manifest["num_rows"], manifest=uri
            ).model_dump()
        log.warning("the manifest %s is not signed with this backfill's key: staging again", uri)
    _clear(common.staging_uri)
    conn = snowflake_connect(common.connect_timeout)
    log.info("connected to Snowflake in %.2fs", time.monotonic() - t0)
    try:
        chunks = (stage_fetch if strategy == StageStrategy.FETCH else stage_unload)(common, conn, target)
    finally:
        conn.close()
    manifest = {
        "version": 1,
        "job_id": common.job_id,
        "table": common.spec.table,
        "strategy": str(strategy),
        "num_chunks": len(chunks),
        "num_rows": sum(c["rows"] for c in chunks),
        "num_bytes": sum(c["bytes"] for c in chunks),
        "chunks": chunks,
        "created": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        # Chunks Snowflake unloads are its own writing, not sealed (seal.py).
        "sealed": k is not None and strategy == StageStrategy.FETCH,
    }
    if k is not None:
        manifest = seal.sign(manifest, k)
    storage.write_json(uri, manifest)
    elapsed = time.monotonic() - t0
    log.info(
        "staged %d rows in %d chunks (%d bytes) in %.1fs (%.0f rows/s)",
        manifest["num_rows"],
        len(chunks),
        manifest["num_bytes"],
        elapsed,
        manifest["num_rows"] / elapsed if elapsed else 0,
    )
    return StagingResult(num_chunks=len(chunks), num_rows=manifest["num_rows"], manifest=uri).model_dump()
