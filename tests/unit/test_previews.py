"""A preview's Job and how its worker's answer becomes the BeamPreview's status (no cluster)."""

from __future__ import annotations

from beam_contract.preview import PreviewResult, PreviewSpec
from beam_contract.worker import LOG_TAIL_MARK
from beam_operator import child_jobs
from beam_operator.config import OperatorConfig
from beam_operator.previews import answer
from beam_operator.reconcile import PodObs

SPEC = PreviewSpec.model_validate(
    {
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": {"partition_key": "block", "start": 1, "end": 100},
        "filter": {"column": "token_address", "values": ["0xabc"]},
    }
)


def pod(succeeded: bool, message: str, exit_code: int = 0) -> PodObs:
    return PodObs(job="p", index=None, succeeded=succeeded, exit_code=exit_code, message=message)


def test_the_answer_becomes_rows_bytes_and_chunks():
    result = PreviewResult(
        num_rows=1000, bytes_per_row=100.0, columns=[{"name": "a", "type": "TEXT"}], sample_z=PreviewResult.pack(["{}"])
    )
    st = answer(pod(True, result.model_dump_json()), chunk_target_bytes=40_000)
    assert (st.phase, st.num_rows, st.estimated_bytes, st.estimated_chunks) == ("succeeded", 1000, 100_000, 3)
    assert st.columns[0].name == "a" and st.sample == ["{}"]
    empty = answer(pod(True, PreviewResult(num_rows=0, bytes_per_row=0.0, columns=[]).model_dump_json()), 40_000)
    assert (empty.estimated_bytes, empty.estimated_chunks) == (0, 0)


def test_a_failed_worker_gives_its_error_line_and_not_its_log_tail():
    msg = f"staging: table x does not exist or is not authorized\n{LOG_TAIL_MARK}\nsome log line"
    st = answer(pod(False, msg, 2), 1)
    assert st.phase == "failed" and st.error_message == "staging: table x does not exist or is not authorized"
    assert answer(pod(False, "", 137), 1).error_message == "the preview worker failed (Error, exit code 137)"
    assert "no termination message" in answer(pod(True, ""), 1).error_message


def test_the_preview_job_gets_snowflake_but_no_bucket_key_or_backfill_label():
    job = child_jobs.preview_job("preview-x", "org1", "0123456789abcdef", SPEC, OperatorConfig())
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "BEAM_SNOWFLAKE_PASSWORD" in env and env["BEAM_SNOWFLAKE_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert not {"BEAM_STAGING_URI", "BEAM_STAGING_KEY"} & set(env)
    assert PreviewSpec.model_validate_json(env["BEAM_SPEC"]["value"]) == SPEC
    assert child_jobs.LABEL_JOB_ID not in job["metadata"]["labels"]  # the backfills' Job watch never sees it
    assert (
        job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == child_jobs.MANAGED_BY
    )  # the workers' NetworkPolicy
    [owner] = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("BeamPreview", "0123456789abcdef", True)
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 60
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["beam-jobrunner", "preview"]


def test_a_filter_too_large_for_the_env_is_refused_before_any_job():
    big = SPEC.model_copy(update={"filter": SPEC.filter.model_copy(update={"values": ["0x" + "a" * 40] * 2000})})
    assert child_jobs.preview_fits(SPEC) and not child_jobs.preview_fits(big)
