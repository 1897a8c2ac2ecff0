"""Transport workers that each deliver many chunks (docs/worker-contract.md, "How chunks are
shared"): the share of each, the progress objects the operator counts (and the rows their
metadata names), a worker started with staging that waits for the manifest, and a worker killed
on a later chunk that resumes there."""

from __future__ import annotations

import json
import signal
import uuid

import pyarrow.fs as pafs
from jr_helpers import Job, expected_ids, managed

from beam_contract import staging
from beam_devstack.substrate.kafka import consume_all
from beam_devstack.substrate.kafka_proxy import END_TXN

WINDOW = {"partition_key": "block", "start": 1000, "end": 2000}


# A chunk per row group (200 rows): five chunks for the window, several per worker.
SMALL_CHUNKS = {"BEAM_CHUNK_TARGET_BYTES": "5000"}


def spec(topic: str) -> dict:
    return {
        "job_name": "workers",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": WINDOW,
        "destinations": [{"type": "kafka", "name": topic}],
    }


def progress(gcs, job: Job) -> set[int]:
    fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=gcs.endpoints()["host_port"], scheme="http")
    sel = pafs.FileSelector(staging.progress_prefix(job.staging).removeprefix("gs://"), allow_not_found=True)
    return {staging.chunk_of_progress(i.path) for i in fs.get_file_info(sel)}


def listed_rows(gcs, job: Job, monkeypatch) -> dict[int, int | None]:
    """What the operator's one listing of the progress objects finds (staged_files), on fake-gcs-server."""
    from beam_operator import staged_files

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoints()["url"])
    staged_files._client.cache_clear()
    try:
        return staged_files.chunks_with_progress(job.staging)
    finally:
        staged_files._client.cache_clear()


def manifest_rows(gcs, job: Job) -> dict[int, int]:
    fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=gcs.endpoints()["host_port"], scheme="http")
    with fs.open_input_stream(staging.manifest_uri(job.staging).removeprefix("gs://")) as f:
        return {c["index"]: c["rows"] for c in json.loads(f.read())["chunks"]}


def keys(kafka, topic: str) -> list[str]:
    return [m.key().decode() for m in consume_all(kafka.bootstrap, managed(topic))]


def test_two_workers_share_the_chunks_and_a_rerun_skips_what_they_delivered(tmp_path, source, bucket, gcs, kafka, rows):
    topic = f"share-{uuid.uuid4().hex[:8]}"
    job = Job(tmp_path, spec(topic), snowflake=source, gcs=gcs, kafka=kafka, extra=SMALL_CHUNKS)
    n = job.stage().json["num_chunks"]
    assert n >= 5, "the small target size must make several chunks per worker"

    results = [job.transport(w, BEAM_TRANSPORT_WORKERS=2) for w in (0, 1)]
    for r in results:
        assert r.code == 0, r.stderr[-3000:]
    assert [r.json["chunks"] for r in results] == [len(range(0, n, 2)), len(range(1, n, 2))]
    assert sum(r.json["rows"] for r in results) == len(expected_ids(rows, blocks=(1000, 2000)))
    assert all(r.json["destinations"][0]["chunks"] == r.json["chunks"] for r in results)
    assert progress(gcs, job) == set(range(n)), "every chunk that reached every destination is counted"

    got = keys(kafka, topic)
    assert len(got) == len(set(got)), "duplicates"
    assert set(got) == set(expected_ids(rows, blocks=(1000, 2000)))

    # A replacement Pod of worker 0 finds its chunks delivered and sends nothing again.
    again = job.transport(0, BEAM_TRANSPORT_WORKERS=2)
    assert again.code == 0, again.stderr[-3000:]
    assert (again.json["chunks"], again.json["skipped"]) == (0, len(range(0, n, 2)))
    assert len(keys(kafka, topic)) == len(got)
    # More workers than chunks: the extra ones have nothing to do and say so.
    idle = job.transport(n, BEAM_TRANSPORT_WORKERS=n + 1)
    assert idle.code == 0 and (idle.json["chunks"], idle.json["skipped"]) == (0, 0)


def test_each_progress_object_names_its_chunks_rows_for_the_operators_listing(
    tmp_path, source, bucket, gcs, kafka, rows, monkeypatch
):
    """rows_delivered: a progress object's custom metadata holds its chunk's rows, and the
    operator's one listing (staged_files.chunks_with_progress) returns chunk -> rows from it."""
    topic = f"rows-{uuid.uuid4().hex[:8]}"
    job = Job(tmp_path, spec(topic), snowflake=source, gcs=gcs, kafka=kafka, extra=SMALL_CHUNKS)
    staged = job.stage().json
    n = staged["num_chunks"]
    assert n >= 3
    assert listed_rows(gcs, job, monkeypatch) == {}, "nothing delivered yet"
    per_chunk = manifest_rows(gcs, job)
    assert sum(per_chunk.values()) == staged["num_rows"] == len(expected_ids(rows, blocks=(1000, 2000)))

    assert job.transport(1, BEAM_TRANSPORT_WORKERS=2).code == 0  # chunks 1, 3, ...
    assert listed_rows(gcs, job, monkeypatch) == {c: per_chunk[c] for c in range(1, n, 2)}
    assert job.transport(0, BEAM_TRANSPORT_WORKERS=2).code == 0
    listed = listed_rows(gcs, job, monkeypatch)
    assert listed == per_chunk and sum(listed.values()) == staged["num_rows"]
    # the object's own (signed) body says the same
    fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=gcs.endpoints()["host_port"], scheme="http")
    with fs.open_input_stream(staging.progress_uri(job.staging, 0).removeprefix("gs://")) as f:
        assert json.loads(f.read())["rows"] == listed[0]


def test_a_worker_started_with_staging_waits_for_the_manifest(tmp_path, source, bucket, gcs, kafka, rows):
    topic = f"await-{uuid.uuid4().hex[:8]}"
    job = Job(tmp_path, spec(topic), snowflake=source, gcs=gcs, kafka=kafka, extra=SMALL_CHUNKS)
    worker = job.start("transport", JOB_COMPLETION_INDEX=0, BEAM_TRANSPORT_WORKERS=1, BEAM_AWAIT_MANIFEST="true")
    try:
        # The observable point: the worker says it waits (no manifest exists before staging).
        seen = []
        for line in worker.stderr:
            seen.append(line)
            if "waiting for the manifest" in line:
                break
        else:
            raise AssertionError("".join(seen)[-3000:])
        staged = job.stage().json
        assert worker.wait(120) == 0, worker.stderr.read()[-3000:]
    finally:
        worker.kill()
    got = keys(kafka, topic)
    assert len(got) == len(set(got)) == staged["num_rows"]
    assert set(got) == set(expected_ids(rows, blocks=(1000, 2000)))
    assert progress(gcs, job) == set(range(staged["num_chunks"]))


def test_a_worker_killed_on_a_later_chunk_resumes_there_exactly_once(tmp_path, source, bucket, gcs, kafka, rows):
    """Chunk 0 delivered (by a worker of one chunk, as a first Pod would have), then the one
    worker of all chunks is SIGKILLed while chunk 1 sits in an open transaction, held by the
    stack's Kafka proxy; its replacement skips chunk 0 and delivers the rest, each once."""
    topic = f"resume-{uuid.uuid4().hex[:8]}"
    job = Job(tmp_path, spec(topic), snowflake=source, gcs=gcs, kafka=kafka, extra=SMALL_CHUNKS)
    n = job.stage().json["num_chunks"]
    assert n >= 3
    assert job.transport(0, BEAM_TRANSPORT_WORKERS=n).code == 0  # worker 0 of n: chunk 0 only
    assert progress(gcs, job) == {0}
    first = len(keys(kafka, topic))

    with kafka.proxy.holding(END_TXN):
        worker = job.start(
            "transport", JOB_COMPLETION_INDEX=0, BEAM_TRANSPORT_WORKERS=1, BEAM_KAFKA_BOOTSTRAP=kafka.proxy.bootstrap
        )
        if not kafka.proxy.wait_held(1, timeout=60):
            worker.kill()
            raise AssertionError(f"the worker never tried to commit: {worker.communicate()[1][-2000:]}")
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(30) == -signal.SIGKILL
    assert len(keys(kafka, topic)) == first, "the killed chunk's rows stay invisible to read_committed"
    assert progress(gcs, job) == {0}

    rerun = job.transport(0, BEAM_TRANSPORT_WORKERS=1)
    assert rerun.code == 0, rerun.stderr[-3000:]
    assert (rerun.json["chunks"], rerun.json["skipped"]) == (n - 1, 1)
    got = keys(kafka, topic)
    assert len(got) == len(set(got)), "duplicates after the kill and the rerun"
    assert set(got) == set(expected_ids(rows, blocks=(1000, 2000)))


def test_a_failure_names_the_chunk_in_the_termination_message(tmp_path, source, bucket, gcs, kafka):
    from beam_contract.worker import parse_failure

    job = Job(
        tmp_path,
        {
            **spec("x"),
            "destinations": [{"type": "kafka", "name": "ext", "bootstrap_servers": kafka.bootstrap, "secret": "s"}],
        },
        snowflake=source,
        gcs=gcs,
        kafka=kafka,
    )
    n = job.stage().json["num_chunks"]
    r = job.transport(1, BEAM_TRANSPORT_WORKERS=2)
    assert r.code == 2, r.stderr[-2000:]
    error, chunk, _ = parse_failure(r.termination)
    assert chunk == 1 and error.startswith("kafka destination 'ext' chunk 1: secret key sasl_username missing"), error
    assert n >= 2
