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
from pathlib import Path

import yaml

from beam_devstack import cli, dataset, k8s
from beam_devstack.proc import progress

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
        from beam_devstack.k8s import _kubeconfig

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
    from beam_devstack.snowflake import connect

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
    from beam_devstack.snowflake import connection_secret

    secret = connection_secret(sf, name=SNOWFLAKE_SECRET)
    kube.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(secret))


def chart_values(state: dict) -> dict:
    from beam_devstack import images

    c = state["components"]

    def image(img) -> dict:
        # Never: a missing image must fail here, not send containerd to a registry off the machine.
        return {"repository": img.repository, "tag": img.tag(), "pullPolicy": "Never"}

    return {
        "operator": {"image": image(images.OPERATOR)},
        "jobrunner": {"image": image(images.JOBRUNNER)},
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
            "chunk_target_bytes": 4 * 2**20,
            "default_parallelism": 2,
            "job_ttl_seconds": 3600,
        },
    }


def _install_operator(state: dict, kube: _Kube) -> None:
    """The chart, as a user installs it: the operator runs as its Deployment on the node."""
    import subprocess

    from beam_devstack.operator_proc import CHART, helm_binary, install_crd

    install_crd(kube)
    values = cli.STACK / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(state)))
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


def worker_time(kube: _Kube, namespace: str, uid: str) -> tuple[float, float, float]:
    """(staging seconds, transport seconds, seconds any worker process ran) from the Pods'
    container start and finish times; the rest of apply→completed is Pod start-up and operator
    reaction. Kubernetes timestamps have 1 s resolution: a rough split, not a profile."""
    pods = kube.core.list_namespaced_pod(namespace, label_selector=f"beam-backfill.dev/job-id={uid}").items
    spans = {"staging": [], "transport": []}
    for p in pods:
        for cs in p.status.container_statuses or []:
            t = cs.state.terminated
            if t and t.started_at and t.finished_at:
                spans[p.metadata.labels.get("beam-backfill.dev/phase", "transport")].append(
                    (t.started_at.timestamp(), t.finished_at.timestamp())
                )

    def union(iv):
        total, end = 0.0, None
        for a, b in sorted(iv):
            if end is None or a > end:
                total += b - a
                end = b
            elif b > end:
                total += b - end
                end = b
        return total

    return union(spans["staging"]), union(spans["transport"]), union(spans["staging"] + spans["transport"])


def run_demo(rows: int, manifest: Path, teardown: bool = False) -> int:
    t_all = time.monotonic()
    state = cli.up()
    kube = _Kube(state["components"]["k8s"]["kubeconfig"])
    _ensure_dataset(state, rows)
    _ensure_bucket(state["components"]["gcs"]["url"])
    kube.create_namespace(NAMESPACE)
    _snowflake_secret(kube, state["components"]["snowflake"])
    _install_operator(state, kube)

    doc = yaml.safe_load(manifest.read_text())
    name, spec = doc["metadata"]["name"], doc["spec"]
    from beam_contract.model import KafkaDestination

    # On the managed Kafka, which organizations share, a destination's topic is <namespace>.<name>.
    kafka_dest = next(d for d in spec["destinations"] if d["type"] == "kafka")
    topic = KafkaDestination.model_validate(kafka_dest).topic_in(NAMESPACE)
    # A re-run starts from scratch: delete the previous backfill (its finalizer cleans up).
    kube.kubectl("delete", "bbf", name, "-n", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=120s")
    before, _ = count_topic(state["components"]["kafka"]["bootstrap"], topic)
    w, f = spec["backfill_window"], spec.get("filter") or {}
    expected = dataset.expected_count(
        _snowflake_conn(state["components"]["snowflake"]),
        table=spec["table"],
        start=w["start"],
        end=w["end"],
        column=f.get("column"),
        values=f.get("values"),
    )
    progress("demo", f"applying {manifest.name} in namespace {NAMESPACE}: {expected:,} rows expected in topic {topic}")
    t_apply = time.monotonic()
    kube.kubectl("apply", "-n", NAMESPACE, "-f", str(manifest))
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
            progress("demo", f"{time.monotonic() - t_apply:6.1f}s  status={line[0]:<12} {chunks}")
            last = line
        if st.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - t_apply
    got, distinct = count_topic(state["components"]["kafka"]["bootstrap"], topic)
    got -= before
    kc = state["components"]["k8s"]["kubeconfig"]
    print()
    print(_kubectl(kc, "get", "beambackfills", "-n", NAMESPACE, "-o", "wide").stdout)
    if st.get("status") != "completed":
        print(f"backfill ended {st.get('status')}: {st.get('error_message')}")
        return 1
    rate = got / elapsed if elapsed else 0
    print(
        f"completed in {elapsed:.1f}s: {got:,} messages in topic {topic} ({distinct:,} distinct keys), "
        f"{expected:,} expected; {rate:,.0f} rows/s end to end"
    )
    stage_s, transport_s, busy = worker_time(kube, NAMESPACE, obj["metadata"]["uid"])
    print(
        f"time in jobrunner processes: staging {stage_s:.0f}s, transport {transport_s:.0f}s; outside the jobrunner "
        f"(Pod start-up, operator reaction): {max(elapsed - busy, 0):.0f}s of {elapsed:.0f}s ({max(elapsed - busy, 0) / elapsed:.0%})"
    )
    print(f"""
Look around:
  export KUBECONFIG={kc}
  kubectl get beambackfills -A            # short name: kubectl get bbf -A
  kubectl describe bbf {name} -n {NAMESPACE}    # status, conditions and Events
  kubectl get jobs,pods -n {NAMESPACE} -o wide
  kubectl logs -n {NAMESPACE} -l beam-backfill.dev/phase=transport --tail=3    # the workers' own words
  kubectl describe pod -n {NAMESPACE} -l beam-backfill.dev/phase=staging
  kubectl logs -n {RELEASE_NAMESPACE} deploy/{RELEASE}-beam-backfill    # the operator
  kubectl get nodes -o wide    # containerd://, a real kubelet
  .venv/bin/beam-dev consume {topic} --max 3    # read_committed consumer on the topic
Tear down: .venv/bin/beam-dev down   (total demo time {time.monotonic() - t_all:.0f}s)""")
    if teardown:
        cli.down()
    return 0 if got == expected and distinct == expected else 1


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
