"""Manifests of the Jobs a backfill runs: one staging Job, and one Indexed transport Job whose
workers start while staging runs and share the chunks (docs/worker-contract.md).

Names are derived from the resource's name and uid only, so an operator that restarts at any
point asks for the same Job again and gets AlreadyExists instead of a duplicate. Every Job
carries a controller ownerReference, so deleting the BeamBackfill garbage-collects them.
"""

from __future__ import annotations

import base64
import gzip
import json
from enum import StrEnum
from typing import Any

from beam_contract import staging
from beam_contract.model import GROUP, KIND, VERSION, BackfillSpec
from beam_contract.preview import PREVIEW_API_VERSION, PREVIEW_KIND, PreviewSpec
from beam_contract.worker import (
    SNOWFLAKE_SECRET_KEYS,
    SPEC_CONFIGMAP_KEY,
    SPEC_INLINE_MAX_BYTES,
    SPEC_MOUNT_DIR,
    Command,
    Env,
    ExitCode,
    destination_env,
    snowflake_env,
)

from .config import OperatorConfig
from .quantity import parse_quantity

LABEL_JOB_ID = f"{GROUP}/job-id"
# The Job's kind (JobKind). The label's key says "phase" for a historical reason and stays as it is:
# deployed Jobs, selectors in docs and tests, and people's kubectl commands select on it.
LABEL_KIND = f"{GROUP}/phase"
LABEL_BACKFILL = f"{GROUP}/backfill"
LABEL_ATTEMPT = f"{GROUP}/attempt"
# Kueue's: a BeamBackfill carrying it has its Jobs queued (created suspended, admitted by Kueue).
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
MANAGED_BY = "beam-backfill-operator"


class JobKind(StrEnum):
    """The two child Jobs of a backfill (label LABEL_KIND); not the backfill's status."""

    STAGING = "staging"
    TRANSPORT = "transport"


STAGING = JobKind.STAGING
TRANSPORT = JobKind.TRANSPORT


def _trunc(name: str, n: int) -> str:
    return name[:n].rstrip("-.")


def child_job_name(name: str, uid: str, kind: JobKind, attempt: int = 1) -> str:
    """The Kubernetes name of a backfill's Job (not the spec's job_name, a display name)."""
    # Pod hostnames of an Indexed Job are <job>-<index>: a DNS label, so no dots (a backfill
    # name may have them) and at most 63 characters. The uid part keeps names distinct. A
    # retry's Jobs are named apart from the first attempt's, which may still exist (their TTL);
    # the first attempt's names are the ones Jobs have had since the first release.
    base = name.replace(".", "-")
    if attempt == 1:
        return f"{_trunc(base, 36)}-{uid[:8]}-{kind}"
    return f"{_trunc(base, 32)}-{uid[:8]}-{kind}-{attempt}"


def staging_uri(config: OperatorConfig, namespace: str, uid: str) -> str:
    return staging.job_staging_uri(config.staging_bucket, config.staging_prefix, namespace, uid)


def labels(name: str, uid: str, kind: JobKind) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "beam-backfill",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB_ID: uid,
        LABEL_KIND: kind,
        LABEL_BACKFILL: _trunc(name, 63),
    }


def _secret_env(var: str, secret: str, key: str) -> dict[str, Any]:
    # optional: a missing Secret must not park the Pod in CreateContainerConfigError forever;
    # the worker sees the variable absent and fails with a message naming Secret and key.
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}


def spec_document(spec: BackfillSpec) -> bytes:
    return json.dumps(spec.model_dump(mode="json", exclude_none=True), separators=(",", ":")).encode()


def spec_travels_inline(spec: BackfillSpec) -> bool:
    """Small specs go in the env; larger ones (a filter of thousands of addresses) in a ConfigMap."""
    return len(spec_document(spec)) <= SPEC_INLINE_MAX_BYTES


def compressed_spec(spec: BackfillSpec) -> bytes:
    return gzip.compress(spec_document(spec), mtime=0)  # mtime 0: the same spec, the same bytes


def spec_config_map_name(name: str, uid: str) -> str:
    return f"{_trunc(name.replace('.', '-'), 36)}-{uid[:8]}-spec"


def spec_config_map(name: str, namespace: str, uid: str, spec: BackfillSpec) -> dict[str, Any]:
    """The ConfigMap a large spec reaches its workers in: immutable, owned by the backfill (the
    garbage collector deletes it with the backfill), gzip'd to fit the 1 MiB a ConfigMap holds."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _owned_meta(spec_config_map_name(name, uid), name, namespace, uid),
        "immutable": True,
        "binaryData": {SPEC_CONFIGMAP_KEY: base64.b64encode(compressed_spec(spec)).decode()},
    }


STAGING_KEY_SECRET_KEY = "key"


def staging_key_secret_name(name: str, uid: str) -> str:
    return f"{_trunc(name.replace('.', '-'), 36)}-{uid[:8]}-staging-key"


def staging_key_secret(name: str, namespace: str, uid: str) -> dict[str, Any]:
    """The Secret holding the backfill's staged-data key (beam_jobrunner.seal), without the key:
    the controller draws it when it creates the Secret, once. Immutable, in the backfill's own
    namespace, owned by it (the garbage collector deletes it with the backfill); only its
    workers read it, through secretKeyRef (docs/security.md, "Staged data")."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _owned_meta(staging_key_secret_name(name, uid), name, namespace, uid),
        "type": "Opaque",
        "immutable": True,
    }


def owner_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the backfill that owns this Job (or Pod of one): its job-id label, but only
    when the object also names that uid as its controlling BeamBackfill owner. A label alone is
    anyone's to write (docs/security.md, "A Job is counted only by its owner"); the caller also
    compares the namespace, since an ownerReference cannot point across namespaces."""
    meta = obj.get("metadata") or {}
    uid = (meta.get("labels") or {}).get(LABEL_JOB_ID)
    if not uid:
        return None
    for ref in meta.get("ownerReferences") or []:
        if ref.get("uid") == uid and ref.get("kind") == KIND and ref.get("controller"):
            return uid
    return None


def _owned_meta(object_name: str, name: str, namespace: str, uid: str) -> dict[str, Any]:
    """Metadata of an object that belongs to the whole backfill (not one Job): its labels without
    the Job kind, owned by it, so the garbage collector deletes it with the backfill."""
    return {
        "name": object_name,
        "namespace": namespace,
        "labels": {k: v for k, v in labels(name, uid, JobKind.STAGING).items() if k != LABEL_KIND},
        "ownerReferences": [_owner(name, uid)],
    }


def _owner(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _spec_env(spec: BackfillSpec) -> dict[str, Any]:
    if spec_travels_inline(spec):
        return {"name": Env.SPEC, "value": spec_document(spec).decode()}
    return {"name": Env.SPEC_FILE, "value": f"{SPEC_MOUNT_DIR}/{SPEC_CONFIGMAP_KEY}"}


def _spec_volume(name: str, uid: str, spec: BackfillSpec) -> dict[str, Any]:
    """Pod spec entries mounting the spec ConfigMap, for a spec that is not inline."""
    if spec_travels_inline(spec):
        return {}
    return {"volumes": [{"name": "spec", "configMap": {"name": spec_config_map_name(name, uid)}}]}


def _common_env(
    spec: BackfillSpec, name: str, namespace: str, uid: str, config: OperatorConfig
) -> list[dict[str, Any]]:
    env = [
        _spec_env(spec),
        {"name": Env.JOB_ID, "value": uid},
        {"name": Env.NAMESPACE, "value": namespace},
        {"name": Env.BACKFILL, "value": name},
        {"name": Env.STAGING_URI, "value": staging_uri(config, namespace, uid)},
        {"name": Env.CONNECT_TIMEOUT_S, "value": str(config.connect_timeout_seconds)},
        # Not optional: a worker never runs without its backfill's key (the Secret is created
        # before the first Job; missing, the Pod waits and the stuck-Pod check names it).
        {
            "name": Env.STAGING_KEY,
            "valueFrom": {"secretKeyRef": {"name": staging_key_secret_name(name, uid), "key": STAGING_KEY_SECRET_KEY}},
        },
    ]
    if config.gcs_endpoint:
        env.append({"name": Env.STORAGE_EMULATOR_HOST, "value": config.gcs_endpoint})
    env += _transform_env(spec, config)
    taken = {e["name"] for e in env}
    env += [{"name": k, "value": v} for k, v in sorted(config.worker_env.items()) if k not in taken]
    return env


def _job(
    *,
    name: str,
    namespace: str,
    uid: str,
    kind: JobKind,
    config: OperatorConfig,
    container: dict[str, Any],
    extra_spec: dict[str, Any],
    pod_meta: dict[str, Any] | None = None,
    pod_extra: dict[str, Any] | None = None,
    suspend: bool = False,
    queue_name: str = "",
    attempt: int = 1,
) -> dict[str, Any]:
    jname = child_job_name(name, uid, kind, attempt)
    lab = {**labels(name, uid, kind), LABEL_ATTEMPT: str(attempt)}
    job_labels = {**lab, QUEUE_NAME_LABEL: queue_name} if queue_name else lab
    pod_labels = {**lab, **((pod_meta or {}).get("labels", {}))}
    pod_spec = _pod_spec(container, config, pod_extra)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": jname,
            "namespace": namespace,
            "labels": job_labels,
            "ownerReferences": [_owner(name, uid)],
        },
        "spec": {
            # Kueue admits a queued Job by unsuspending it; a suspended backfill's Job starts so.
            "suspend": suspend or bool(queue_name),
            "ttlSecondsAfterFinished": config.job_ttl_seconds,
            **extra_spec,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def _pod_spec(container: dict[str, Any], config: OperatorConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every worker Pod's spec: one container, never restarted in place, the workers' identity
    without an API token."""
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "enableServiceLinks": False,
        **(extra or {}),
    }
    if config.worker_service_account:
        spec["serviceAccountName"] = config.worker_service_account
        spec["automountServiceAccountToken"] = False
    return spec


def worker_resources(spec: BackfillSpec, config: OperatorConfig) -> dict[str, Any]:
    """The operator's worker_resources, with what the backfill's spec.resources sets over them."""
    out = {k: dict(v) for k, v in config.worker_resources.items() if isinstance(v, dict)}
    if spec.resources is not None:
        asked: dict[str, dict[str, str]] = {}
        for kind in ("requests", "limits"):
            amounts = getattr(spec.resources, kind)
            if amounts is not None:
                asked[kind] = amounts.model_dump(exclude_none=True)
                out.setdefault(kind, {}).update(asked[kind])
        # A default request above a limit the spec sets is lowered to it (the apiserver would
        # refuse the Pod); a request the spec itself sets above a limit is refused (_beyond_bounds).
        requests = out.get("requests", {})
        for key, limit in asked.get("limits", {}).items():
            mine = key in asked.get("requests", {})
            if key in requests and not mine and parse_quantity(requests[key]) > parse_quantity(limit):
                requests[key] = limit
    return {k: v for k, v in out.items() if v}


def _container(
    command: Command, env: list[dict[str, Any]], config: OperatorConfig, spec: BackfillSpec
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "jobrunner",
        "image": config.jobrunner_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["beam-jobrunner", command],
        "env": env,
        # Only what the worker wrote itself, masked (jobrunner/log_tail.py): never the raw log
        # the kubelet would copy from a crash, which no one has masked. A crash without a
        # message is reported by its reason (OOMKilled) and exit code (reconcile._worker_message).
        "terminationMessagePolicy": "File",
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
    }
    if resources := worker_resources(spec, config):
        c["resources"] = resources
    if any(e["name"] == Env.SPEC_FILE for e in env):
        c["volumeMounts"] = [{"name": "spec", "mountPath": SPEC_MOUNT_DIR, "readOnly": True}]
    return c


def staging_job(
    name: str,
    namespace: str,
    uid: str,
    spec: BackfillSpec,
    config: OperatorConfig,
    queue_name: str = "",
    attempt: int = 1,
) -> dict[str, Any]:
    env = _common_env(spec, name, namespace, uid, config)
    env += [
        {"name": Env.STAGE_STRATEGY, "value": config.stage_strategy},
        {"name": Env.CHUNK_TARGET_BYTES, "value": str(config.chunk_target_bytes)},
    ]
    if config.unload_stage:
        env.append({"name": Env.UNLOAD_STAGE, "value": config.unload_stage})
    env += [_secret_env(snowflake_env(k), config.snowflake_secret, k) for k in SNOWFLAKE_SECRET_KEYS]
    return _job(
        name=name,
        namespace=namespace,
        uid=uid,
        kind=STAGING,
        config=config,
        container=_container(Command.STAGE, env, config, spec),
        pod_extra=_spec_volume(name, uid, spec),
        suspend=spec.suspend,
        queue_name=queue_name,
        attempt=attempt,
        extra_spec={
            "backoffLimit": config.staging_backoff_limit,
            "podFailurePolicy": {
                "rules": [
                    {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [int(ExitCode.PERMANENT)]}},
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
        },
    )


def transport_workers(spec: BackfillSpec, config: OperatorConfig, num_chunks: int | None) -> int:
    """How many transport workers (Pods at once, and indexes of the Job) share the chunks: the
    backfill's parallelism, and no more than there are chunks once that is known."""
    workers = spec.parallelism or config.default_parallelism
    return max(1, min(workers, num_chunks)) if num_chunks is not None else workers


def transport_job(
    name: str,
    namespace: str,
    uid: str,
    spec: BackfillSpec,
    config: OperatorConfig,
    num_chunks: int | None,
    queue_name: str = "",
    attempt: int = 1,
) -> dict[str, Any]:
    """The transport Job: one index per worker, each delivering its share of the chunks
    (beam_contract.worker.worker_chunks). Created with num_chunks None while staging still runs:
    its workers then wait for the manifest, and there are `parallelism` of them."""
    workers = transport_workers(spec, config, num_chunks)
    env = _common_env(spec, name, namespace, uid, config)
    env.append({"name": Env.MANIFEST_URI, "value": staging.manifest_uri(staging_uri(config, namespace, uid))})
    env.append({"name": Env.TRANSPORT_WORKERS, "value": str(workers)})
    if num_chunks is None:
        env.append({"name": Env.AWAIT_MANIFEST, "value": "true"})
    if config.managed_kafka_bootstrap:
        env.append({"name": Env.KAFKA_BOOTSTRAP, "value": config.managed_kafka_bootstrap})
    if config.destination_allow:
        env.append({"name": Env.DESTINATION_ALLOW, "value": ",".join(config.destination_allow)})
    if not config.secret_endpoints_required:
        env.append({"name": Env.SECRET_ENDPOINTS_REQUIRED, "value": "false"})
    if config.cluster_cidrs:
        env.append({"name": Env.CLUSTER_CIDRS, "value": ",".join(config.cluster_cidrs)})
    for i, dest in enumerate(spec.destinations):
        secret = getattr(dest, "secret", None) or getattr(dest, "hash_key", None)
        if secret:
            env += [_secret_env(destination_env(i, k), secret, k) for k in dest.secret_keys]
    pod_meta: dict[str, Any] = {}
    pod_extra: dict[str, Any] = _spec_volume(name, uid, spec)
    if spec.static_egress_ip:
        pod_meta["labels"] = dict(config.egress.pod_labels)
        if config.egress.node_selector:
            pod_extra["nodeSelector"] = dict(config.egress.node_selector)
        if config.egress.tolerations:
            pod_extra["tolerations"] = list(config.egress.tolerations)
    return _job(
        name=name,
        namespace=namespace,
        uid=uid,
        kind=TRANSPORT,
        config=config,
        container=_container(Command.TRANSPORT, env, config, spec),
        pod_meta=pod_meta,
        pod_extra=pod_extra,
        suspend=spec.suspend,
        queue_name=queue_name,
        attempt=attempt,
        extra_spec={
            "completionMode": "Indexed",
            "completions": workers,
            "parallelism": workers,
            # Failures of one worker's Pods (not evictions) before the backfill fails; each
            # replacement resumes at the first of its chunks not delivered yet.
            "backoffLimitPerIndex": (
                config.backoff_limit_per_index if spec.backoff_limit_per_index is None else spec.backoff_limit_per_index
            ),
            # One chunk that cannot be delivered fails the backfill: the user must hear about it
            # now, not after every other chunk has been sent.
            "maxFailedIndexes": 0,
            "podFailurePolicy": {
                "rules": [
                    {"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [int(ExitCode.PERMANENT)]}},
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
        },
    )


# --- previews (beam_contract.preview) ------------------------------------------------------

LABEL_PREVIEW = f"{GROUP}/preview"


def _transform_env(spec: BackfillSpec | PreviewSpec, config: OperatorConfig) -> list[dict[str, str]]:
    """The sandbox's limits, for a worker that runs spec.transforms: staging compiles them,
    transport and previews run them (docs/transforms.md)."""
    if not spec.transforms:
        return []
    return [
        {"name": Env.TRANSFORM_MEMORY_MIB, "value": str(config.transform_memory_mib)},
        {"name": Env.TRANSFORM_TIMEOUT_S, "value": str(config.transform_timeout_seconds)},
    ]


def preview_job_name(name: str, uid: str) -> str:
    return f"{_trunc(name.replace('.', '-'), 40)}-{uid[:8]}-preview"


def preview_job(name: str, namespace: str, uid: str, spec: PreviewSpec, config: OperatorConfig) -> dict[str, Any]:
    """The one Pod of a preview: the staging worker's image, identity, Snowflake env and limits,
    no bucket and no key (it writes nothing). Owned by the BeamPreview, so deleting it deletes
    the Job; labelled apart from backfills' Jobs (no LABEL_JOB_ID), so the backfill controller
    never sees it, and with the workers' labels, so the workers' NetworkPolicy applies."""
    document = json.dumps(spec.model_dump(mode="json", exclude_none=True), separators=(",", ":"))
    env = [
        {"name": Env.SPEC, "value": document},
        {"name": Env.JOB_ID, "value": uid},
        {"name": Env.NAMESPACE, "value": namespace},
        {"name": Env.BACKFILL, "value": name},
        {"name": Env.CONNECT_TIMEOUT_S, "value": str(config.connect_timeout_seconds)},
        *_transform_env(spec, config),
    ]
    taken = {e["name"] for e in env}
    env += [{"name": k, "value": v} for k, v in sorted(config.worker_env.items()) if k not in taken]
    env += [_secret_env(snowflake_env(k), config.snowflake_secret, k) for k in SNOWFLAKE_SECRET_KEYS]
    container: dict[str, Any] = {
        "name": "jobrunner",
        "image": config.jobrunner_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["beam-jobrunner", Command.PREVIEW],
        "env": env,
        "terminationMessagePolicy": "File",
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
    }
    if resources := {k: dict(v) for k, v in config.worker_resources.items() if isinstance(v, dict) and v}:
        container["resources"] = resources
    lab = {
        "app.kubernetes.io/name": "beam-backfill",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_PREVIEW: uid,
    }
    pod_spec = _pod_spec(container, config)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": preview_job_name(name, uid),
            "namespace": namespace,
            "labels": lab,
            "ownerReferences": [
                {
                    "apiVersion": PREVIEW_API_VERSION,
                    "kind": PREVIEW_KIND,
                    "name": name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "backoffLimit": 0,  # a preview is asked again, not retried
            "activeDeadlineSeconds": int(config.preview_timeout_seconds),
            "ttlSecondsAfterFinished": 60,
            "template": {"metadata": {"labels": lab}, "spec": pod_spec},
        },
    }


def preview_fits(spec: PreviewSpec) -> bool:
    return (
        len(json.dumps(spec.model_dump(mode="json", exclude_none=True), separators=(",", ":"))) <= SPEC_INLINE_MAX_BYTES
    )
