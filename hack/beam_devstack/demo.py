"""`beam-dev demo`: the whole product on the local stack, as a user would run it.

1. `beam-dev up` (control plane, a real node, Kafka, GCS, fakesnow, NATS, SNS);
2. a synthetic base.assets.erc20_token_transfers loaded into fakesnow (once per stack);
3. the CRD applied and the chart installed with `helm upgrade --install`, from the images the
   Dockerfiles build (beam_devstack.images), configured for the local stack (`fetch` staging);
4. examples/seed-usdc-base.yaml applied in namespace org123 (the seed's organization);
5. a progress line every second until the backfill ends; then the messages in the topic are
   counted with a read_committed consumer and compared with Snowflake's own count.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from beam_devstack import cli, dataset
from beam_devstack.substrate import k8s
from beam_devstack.substrate.proc import progress

NAMESPACE = "org123"
BUCKET = "beam-staging"
RELEASE, RELEASE_NAMESPACE = "beam", "beam-system"
SNOWFLAKE_SECRET = "beam-snowflake"


def _kubectl(kubeconfig: str, *args: str, input: str | None = None, check: bool = True):
    import subprocess

    p = subprocess.run(
        ["kubectl", *args],
        env=dict(os.environ, KUBECONFIG=kubeconfig),
        capture_output=True,
        text=True,
        input=input,
        timeout=120,
    )
    if check and p.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {p.stderr.strip()}")
    return p


class _Kube:
    """Just enough of ControlPlane's helpers for install_crd/install_chart_rbac on a running stack."""

    def __init__(self, kubeconfig: str) -> None:
        from kubernetes import client, config

        self.kubeconfig_path = kubeconfig
        self.api_client = config.new_client_from_config(kubeconfig)
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.run_dir = Path(kubeconfig).parent

    def kubectl(self, *args: str, input: str | None = None, check: bool = True):
        return _kubectl(self.kubeconfig_path, *args, input=input, check=check)

    def create_namespace(self, name: str) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.create_namespace({"metadata": {"name": name}})
        except ApiException as e:
            if e.status != 409:
                raise
        for _ in range(300):
            try:
                self.core.read_namespaced_service_account("default", name)
                return name
            except ApiException:
                time.sleep(0.1)
        raise TimeoutError(f"namespace {name} has no default ServiceAccount")

    def kubeconfig_for_service_account(self, namespace: str, name: str, create: bool = False) -> Path:
        from beam_devstack.substrate.k8s import _kubeconfig

        tr = self.core.create_namespaced_service_account_token(
            name, namespace, {"spec": {"expirationSeconds": 7 * 24 * 3600}}
        )
        cfg = yaml.safe_load(Path(self.kubeconfig_path).read_text())
        cluster = cfg["clusters"][0]["cluster"]
        path = self.run_dir / "kubeconfigs" / f"sa-{namespace}-{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        ca = self.run_dir / "pki" / "ca.crt"
        path.write_text(
            _kubeconfig(
                cluster["server"],
                ca,
                f"system:serviceaccount:{namespace}:{name}",
                {"token": tr.status.token},
                namespace=namespace,
            )
        )
        path.chmod(0o600)
        return path


def _snowflake_conn(sf: dict):
    from beam_devstack.substrate.snowflake import connect

    return connect(sf, "base", "assets")


def _ensure_dataset(state: dict, rows: int) -> None:
    if state.get("dataset_rows") == rows:
        progress("demo", f"dataset already loaded ({rows:,} rows)")
        return
    dataset.load(_snowflake_conn(state["components"]["snowflake"]), rows)
    state["dataset_rows"] = rows
    cli.STATE.write_text(json.dumps(state, indent=2))


def _ensure_bucket(gcs_url: str) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="beam-backfill", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs_url}
    )
    if client.lookup_bucket(BUCKET) is None:
        client.create_bucket(BUCKET)


def _snowflake_secret(kube: _Kube, sf: dict) -> None:
    from beam_devstack.snowflake_secret import connection_secret

    secret = connection_secret(sf, name=SNOWFLAKE_SECRET)
    kube.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(secret))


def chart_values(state: dict, **config) -> dict:
    """The chart's values for the local stack; `config` overrides its `config` entries."""
    from beam_devstack import images

    c = state["components"]

    def image(img) -> dict:
        # Never: a missing image must fail here, not send containerd to a registry off the machine.
        return {"repository": img.repository, "tag": img.tag(), "pullPolicy": "Never"}

    return {
        "operator": {"image": image(images.OPERATOR)},
        "jobrunner": {"image": image(images.JOBRUNNER)},
        # The REST API and its web console (docs/console.md), as their Deployment behind a Service.
        "api": {"enabled": True},
        # The workers' ServiceAccount in the organization's namespace (a Pod uses its own namespace's).
        "worker": {"serviceAccount": {"namespaces": [NAMESPACE]}},
        "config": {
            "stage_strategy": "fetch",
            "gcs_endpoint": c["gcs"]["url"],
            "staging_bucket": BUCKET,
            "managed_kafka_bootstrap": c["kafka"]["bootstrap"],
            # The stack's servers listen on the node's bridge address (docs/security.md).
            "destination_allow": [f"{cli.NODE['node_ip']}/32"],
            "cluster_cidrs": [cli.NODE["pod_cidr"], k8s.SERVICE_CIDR],
            "allowed_tables": [dataset.TABLE],
            "snowflake_secret": SNOWFLAKE_SECRET,
            # Small chunks (production default: 64 MiB) so that the demo's month makes a dozen
            # chunks and chunks_left visibly counts down.
            "chunk_target_bytes": DEMO_CHUNK_BYTES,
            "default_parallelism": 2,
            "job_ttl_seconds": 3600,
            **config,
        },
    }


DEMO_CHUNK_BYTES = 4 * 2**20


def install_operator(state: dict, kube: _Kube, **config) -> None:
    """The chart, as a user installs it: the operator runs as its Deployment on the node."""
    import subprocess

    from beam_devstack.operator_proc import CHART, helm_binary, install_crd

    install_crd(kube)
    values = cli.STACK / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(state, **config)))
    t0 = time.monotonic()
    argv = [helm_binary(), "upgrade", "--install", RELEASE, str(CHART), "--kubeconfig", kube.kubeconfig_path]
    argv += [
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "--values",
        str(values),
        "--wait",
        "--timeout",
        "180s",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        pods = _kubectl(kube.kubeconfig_path, "describe", "pods", "-n", RELEASE_NAMESPACE, check=False).stdout
        raise RuntimeError(f"helm install failed: {done.stderr.strip()}\n{pods[-3000:]}")
    # An upgrade that changed the config rolls the Deployment: wait for the one new operator Pod.
    kube.kubectl("rollout", "status", "-n", RELEASE_NAMESPACE, f"deploy/{RELEASE}-beam-backfill", "--timeout=180s")
    progress(
        "demo", f"operator running as the chart's Deployment in {RELEASE_NAMESPACE} ({time.monotonic() - t0:.1f}s)"
    )


def count_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> tuple[int, int]:
    """(messages, distinct keys) in `topic`, read_committed, read to the end of every partition."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"beam-demo-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        md = c.list_topics(topic, timeout=10)
        if topic not in md.topics or md.topics[topic].error is not None:
            return 0, 0
        parts = [TopicPartition(topic, p) for p in md.topics[topic].partitions]
        ends = {}
        for tp in parts:
            lo, hi = c.get_watermark_offsets(tp, timeout=10)
            ends[tp.partition] = hi
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        n, keys = 0, set()
        done = {p for p, hi in ends.items() if hi == 0}
        deadline = time.monotonic() + timeout
        while len(done) < len(ends) and time.monotonic() < deadline:
            for m in c.consume(10_000, timeout=1.0):
                if m.error():
                    continue
                n += 1
                keys.add(m.key())
                # Offsets past the last data message belong to transaction markers: stop at
                # the high watermark of each partition.
                if m.offset() + 1 >= ends[m.partition()] - 1:
                    done.add(m.partition())
            for p, hi in ends.items():
                pos = c.position([TopicPartition(topic, p)])[0].offset
                if pos >= hi:
                    done.add(p)
        return n, len(keys)
    finally:
        c.close()


@dataclass
class WorkerTime:
    """Where a backfill's time went, from its Pods' container start and finish times (1 s
    resolution: a rough split, not a profile). Whatever is not inside a worker process is Pod
    start-up and operator reaction."""

    staging: float  # seconds any staging container ran
    transport: float  # seconds any transport container ran (waiting for the manifest included)
    busy: float  # seconds any worker container ran
    pods: dict[str, int]  # Pods created, by kind

    @classmethod
    def of(cls, kube: _Kube, namespace: str, uid: str) -> WorkerTime:
        pods = kube.core.list_namespaced_pod(namespace, label_selector=f"beam-backfill.dev/job-id={uid}").items
        spans: dict[str, list[tuple[float, float]]] = {"staging": [], "transport": []}
        created: dict[str, int] = {"staging": 0, "transport": 0}
        for p in pods:
            kind = p.metadata.labels.get("beam-backfill.dev/phase", "transport")
            created[kind] = created.get(kind, 0) + 1
            for cs in p.status.container_statuses or []:
                t = cs.state.terminated
                if t and t.started_at and t.finished_at:
                    spans.setdefault(kind, []).append((t.started_at.timestamp(), t.finished_at.timestamp()))
        return cls(
            staging=_union(spans["staging"]),
            transport=_union(spans["transport"]),
            busy=_union(spans["staging"] + spans["transport"]),
            pods=created,
        )


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


@dataclass
class Outcome:
    """One backfill applied and followed to its end, as the demo reports it."""

    name: str
    status: str
    error: str | None
    elapsed: float  # kubectl apply -> the final status seen
    expected: int
    messages: int
    distinct: int
    topic: str
    workers: WorkerTime | None

    @property
    def exactly_once(self) -> bool:
        return self.status == "completed" and self.messages == self.distinct == self.expected

    @property
    def outside(self) -> float:
        return max(self.elapsed - self.workers.busy, 0.0) if self.workers else self.elapsed

    def figures(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.elapsed, 2),
            "rows": self.expected,
            "exactly_once": self.exactly_once,
            "rows_per_second": round(self.messages / self.elapsed) if self.elapsed else 0,
            "staging_container_seconds": self.workers and self.workers.staging,
            "transport_container_seconds": self.workers and self.workers.transport,
            "outside_seconds": round(self.outside, 2),
            "outside_share": round(self.outside / self.elapsed, 3) if self.elapsed else 0,
            "pods": self.workers and self.workers.pods,
        }


def prepare(rows: int) -> tuple[dict, _Kube]:
    """The stack up, the dataset loaded, the organization's namespace and Snowflake Secret."""
    state = cli.up()
    kube = _Kube(state["components"]["k8s"]["kubeconfig"])
    _ensure_dataset(state, rows)
    _ensure_bucket(state["components"]["gcs"]["url"])
    kube.create_namespace(NAMESPACE)
    _snowflake_secret(kube, state["components"]["snowflake"])
    return state, kube


def run_backfill(state: dict, kube: _Kube, doc: dict, *, say=progress) -> Outcome:
    """Apply `doc` (a BeamBackfill) in the demo's namespace, print its progress, wait for its end,
    and count what arrived in its Kafka topic."""
    name, spec = doc["metadata"]["name"], doc["spec"]
    from beam_contract.model import KafkaDestination

    # On the managed Kafka, which organizations share, a destination's topic is <namespace>.<name>.
    kafka_dest = next(d for d in spec["destinations"] if d["type"] == "kafka")
    topic = KafkaDestination.model_validate(kafka_dest).topic_in(NAMESPACE)
    bootstrap = state["components"]["kafka"]["bootstrap"]
    # A re-run starts from scratch: delete the previous backfill (its finalizer cleans up).
    kube.kubectl("delete", "bbf", name, "-n", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=120s")
    before, _ = count_topic(bootstrap, topic)
    w, f = spec["backfill_window"], spec.get("filter") or {}
    expected = dataset.expected_count(
        _snowflake_conn(state["components"]["snowflake"]),
        table=spec["table"],
        start=w["start"],
        end=w["end"],
        column=f.get("column"),
        values=f.get("values"),
    )
    say("demo", f"applying {name} in namespace {NAMESPACE}: {expected:,} rows expected in topic {topic}")
    t_apply = time.monotonic()
    kube.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(doc))
    last = None
    st: dict = {}
    while True:
        obj = kube.custom.get_namespaced_custom_object(
            "beam-backfill.dev", "v1alpha1", NAMESPACE, "beambackfills", name
        )
        st = obj.get("status") or {}
        line = (st.get("status") or "pending", st.get("num_chunks"), st.get("chunks_left"))
        if line != last:
            chunks = (
                f"chunks {st.get('num_chunks')} left {st.get('chunks_left')}"
                if st.get("num_chunks") is not None
                else "chunks -"
            )
            say("demo", f"{time.monotonic() - t_apply:6.1f}s  status={line[0]:<12} {chunks}")
            last = line
        if st.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - t_apply
    got, distinct = count_topic(bootstrap, topic)
    return Outcome(
        name=name,
        status=st.get("status", ""),
        error=st.get("error_message"),
        elapsed=elapsed,
        expected=expected,
        messages=got - before,
        distinct=distinct,
        topic=topic,
        workers=WorkerTime.of(kube, NAMESPACE, obj["metadata"]["uid"]),
    )


def console_access(kube: _Kube) -> tuple[str, str]:
    """The console's URL and a fresh API key for the demo's organization (made as an
    administrator makes one: docs/api.md)."""
    from beam_operator.api import keys as keymod

    svc = kube.core.read_namespaced_service(f"{RELEASE}-beam-backfill-api", RELEASE_NAMESPACE)
    url = f"http://{svc.spec.cluster_ip}:{svc.spec.ports[0].port}/console"
    _, key = keymod.create_key(kube.core, f"{RELEASE_NAMESPACE}-api-keys", NAMESPACE, "hack/demo")
    return url, key


def run_demo(rows: int, manifest: Path, teardown: bool = False, chunk_bytes: int | None = None) -> int:
    t_all = time.monotonic()
    state, kube = prepare(rows)
    install_operator(state, kube, chunk_target_bytes=chunk_bytes or DEMO_CHUNK_BYTES)
    doc = yaml.safe_load(manifest.read_text())
    name = doc["metadata"]["name"]
    out = run_backfill(state, kube, doc)
    kc = state["components"]["k8s"]["kubeconfig"]
    print()
    print(_kubectl(kc, "get", "beambackfills", "-n", NAMESPACE, "-o", "wide").stdout)
    if out.status != "completed":
        print(f"backfill ended {out.status}: {out.error}")
        return 1
    rate = out.messages / out.elapsed if out.elapsed else 0
    print(
        f"completed in {out.elapsed:.1f}s: {out.messages:,} messages in topic {out.topic} ({out.distinct:,} distinct "
        f"keys), {out.expected:,} expected; {rate:,.0f} rows/s end to end"
    )
    w = out.workers
    print(
        f"time in jobrunner processes: staging {w.staging:.0f}s, transport {w.transport:.0f}s (from when its Pods "
        f"started, waiting for staging included); outside the jobrunner (Pod start-up, operator reaction): "
        f"{out.outside:.0f}s of {out.elapsed:.0f}s ({out.outside / out.elapsed:.0%}); Pods: "
        f"{w.pods.get('staging', 0)} staging, {w.pods.get('transport', 0)} transport"
    )
    console, key = console_access(kube)
    print(f"""
The web console (this machine's browser; the Service's ClusterIP, routed by kube-proxy):
  {console}
  sign in with this API key of organization {NAMESPACE}: {key}
Look around:
  export KUBECONFIG={kc}
  kubectl get beambackfills -A            # short name: kubectl get bbf -A
  kubectl describe bbf {name} -n {NAMESPACE}    # status, conditions and Events
  kubectl get jobs,pods -n {NAMESPACE} -o wide
  kubectl logs -n {NAMESPACE} -l beam-backfill.dev/phase=transport --tail=3    # the workers' own words
  kubectl describe pod -n {NAMESPACE} -l beam-backfill.dev/phase=staging
  kubectl logs -n {RELEASE_NAMESPACE} deploy/{RELEASE}-beam-backfill    # the operator
  kubectl get nodes -o wide    # containerd://, a real kubelet
  .venv/bin/beam-dev consume {out.topic} --max 3    # read_committed consumer on the topic
Tear down: .venv/bin/beam-dev down   (total demo time {time.monotonic() - t_all:.0f}s)""")
    if teardown:
        cli.down()
    return 0 if out.exactly_once else 1


def consume(topic: str, max_messages: int) -> int:
    from confluent_kafka import Consumer

    state = cli.load_state()
    c = Consumer(
        {
            "bootstrap.servers": state["components"]["kafka"]["bootstrap"],
            "group.id": f"beam-dev-{uuid.uuid4()}",
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.subscribe([topic])
    n = 0
    deadline = time.monotonic() + 20
    try:
        while n < max_messages and time.monotonic() < deadline:
            m = c.poll(1.0)
            if m is None or m.error():
                continue
            headers = {k: v.decode() for k, v in (m.headers() or [])}
            print(f"key={m.key().decode()} partition={m.partition()} offset={m.offset()} headers={headers}")
            print(m.value().decode())
            n += 1
    finally:
        c.close()
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(
        run_demo(int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000, cli.ROOT / "examples" / "seed-usdc-base.yaml")
    )
