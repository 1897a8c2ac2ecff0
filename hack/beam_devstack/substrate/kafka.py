"""A real one-node Apache Kafka (KRaft, broker and controller in one JVM) on 127.0.0.1 (or `host`).

The jars come from Maven Central through hack/kafka/pom.xml and are cached per version; the
broker runs on the machine's Java 17. Settings suit tests: replication factor 1 everywhere
(transactions need it, a one-node cluster cannot meet the default of 3), small internal topics
so the first consumer group and the first transaction do not wait for 50 partitions to be
created, and no initial rebalance delay.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from beam_devstack.substrate import pki
from beam_devstack.substrate.kafka_proxy import KafkaProxy
from beam_devstack.substrate.proc import CACHE, Server, debian_tool, free_port, progress

VERSION = os.environ.get("BEAM_KAFKA_VERSION", "4.4.0")
POM = Path(__file__).resolve().parents[2] / "kafka" / "pom.xml"
READY_TIMEOUT = 120.0


def libs_dir(version: str = VERSION) -> Path:
    return CACHE / f"kafka-{version}" / "libs"


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("Kafka needs Java 17 or newer on PATH (Debian: apt-get install openjdk-17-jre-headless)")
    return java


def _mvn() -> str:
    return debian_tool("mvn", "maven", "kafka")


def ensure_installed(version: str = VERSION) -> Path:
    """Resolve org.apache.kafka:kafka_2.13 and its runtime jars into the cache; return the dir."""
    libs = libs_dir(version)
    done = libs.parent / ".complete"
    if done.exists():
        return libs
    progress("kafka", f"fetching Kafka {version} jars from Maven Central into {libs}")
    # A half-copied libs dir would start a broker with a broken classpath: copy beside, then move.
    staging = libs.parent / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    libs.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    result = subprocess.run(
        [
            _mvn(),
            "-B",
            "-q",
            "-f",
            str(POM),
            f"-Dkafka.version={version}",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mvn could not resolve Kafka {version}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    done.write_text(version)
    jars = list(libs.glob("*.jar"))
    size = sum(j.stat().st_size for j in jars)
    progress("kafka", f"{len(jars)} jars, {size / 2**20:.1f} MiB in {time.monotonic() - t0:.1f}s")
    return libs


def _cluster_id() -> str:
    # KRaft wants a base64url UUID without padding, as `kafka-storage random-uuid` prints. Like
    # Kafka's own Uuid.randomUuid(), never one starting with "-": the storage tool's argument
    # parser reads `-t -xyz` as a missing value (1 start in 64 failed that way).
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


LOG4J2 = """\
status = error
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
"""


class Kafka(Server):
    component = "kafka"
    grace = 15.0

    def __init__(
        self,
        run_dir: Path,
        *,
        detach: bool = False,
        pid_dir: Path | None = None,
        version: str = VERSION,
        heap: str = "512m",
        log_level: str = "WARN",
        host: str = "127.0.0.1",
    ) -> None:
        # 127.0.0.1, or a real node's bridge address (node.py), where Pods reach the broker.
        super().__init__(run_dir, detach=detach, pid_dir=pid_dir, host=host)
        self.version = version
        self.heap = heap
        self.log_level = log_level
        self.controller_port: int | None = None
        # A second listener, advertised at a proxy's port (fault tests; see kafka_proxy.py).
        self.proxied_port: int | None = None
        self._proxy_port: int | None = None
        self.proxy: KafkaProxy | None = None
        # A third, as a managed Kafka is reached: SASL_SSL with PLAIN, a certificate from a CA of
        # this broker's own (ca_pem), one user (sasl_user, sasl_password) made at each start.
        self.sasl_ssl_port: int | None = None
        self.sasl_user = "beam-e2e"
        self.sasl_password = ""
        self.ca_pem = ""

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return f"{self.host}:{self.sasl_ssl_port}"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def endpoints(self) -> dict:
        return {"bootstrap": self.bootstrap, "sasl_ssl_bootstrap": self.sasl_ssl_bootstrap}

    def sasl_ssl_client_config(self) -> dict[str, str]:
        """librdkafka settings of a client of the SASL_SSL listener."""
        return {
            "bootstrap.servers": self.sasl_ssl_bootstrap,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "PLAIN",
            "sasl.username": self.sasl_user,
            "sasl.password": self.sasl_password,
            "ssl.ca.pem": self.ca_pem,
        }

    def _write_config(self) -> Path:
        ports: set[int] = set()
        while len(ports) < 5:
            ports.add(free_port())
        self.port, self.controller_port, self.proxied_port, self._proxy_port, self.sasl_ssl_port = sorted(ports)
        data = self.run_dir / "data"
        tls = self.run_dir / "tls"
        ca, ca_key = pki.make_ca(tls / "ca", "beam-devstack-kafka-ca")
        crt, key = pki.issue_cert(
            tls / "broker", ca, ca_key, "kafka", server=True, ips=(self.host,), dns=("localhost",)
        )
        # Kafka's PEM keystore: the key and its certificate in one file.
        keystore = tls / "broker.pem"
        keystore.write_bytes(key.read_bytes() + crt.read_bytes())
        keystore.chmod(0o600)
        self.ca_pem = ca.read_text()
        self.sasl_password = secrets.token_urlsafe(18)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://127.0.0.1:{self.controller_port},"
            f"PROXIED://{self.host}:{self.proxied_port},SASL_SSL://{self.host}:{self.sasl_ssl_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port},PROXIED://{self.host}:{self._proxy_port},"
            f"SASL_SSL://{self.host}:{self.sasl_ssl_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PROXIED:PLAINTEXT,"
            "SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_ssl.plain.sasl.jaas.config": "org.apache.kafka.common.security.plain.PlainLoginModule "
            f'required user_{self.sasl_user}="{self.sasl_password}";',
            "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
            "listener.name.sasl_ssl.ssl.keystore.location": str(keystore),
            "log.dirs": str(data),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Tests delete topics; without this a re-created name can collide with its ghost.
            "delete.topic.enable": "true",
        }
        cfg = self.run_dir / "server.properties"
        cfg.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.run_dir / "log4j2.properties").write_text(
            LOG4J2.format(log=self.run_dir / "kafka.log", level=self.log_level)
        )
        return cfg

    def _java_argv(self, main: str, *args: str) -> list[str]:
        libs = ensure_installed(self.version)
        return [
            _java(),
            f"-Xms{min(self.heap, '256m', key=_mib)}",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.run_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.run_dir}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def start(self) -> Kafka:
        ensure_installed(self.version)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        cfg = self._write_config()
        t0 = time.monotonic()
        fmt = subprocess.run(
            self._java_argv("kafka.tools.StorageTool", "format", "--standalone", "-t", _cluster_id(), "-c", str(cfg)),
            capture_output=True,
            text=True,
        )
        if fmt.returncode != 0:
            raise RuntimeError(f"formatting Kafka storage failed:\n{fmt.stdout}\n{fmt.stderr}")
        self._start(
            "kafka",
            self._java_argv("kafka.Kafka", str(cfg)),
            log="stdout.log",
            # Clients are only created once the port answers: librdkafka logs every refused
            # connection, which would bury the broker's own log in the test output.
            tcp=(self.host, self.port),
            ready="listening",
            checks=[
                (self._lists_topics, "listing topics"),
                # The transaction coordinator's topic is created lazily by the first transactional
                # producer; do it here so tests that use transactions do not pay for it or race it.
                (self._inits_transactions, "accepting transactions"),
            ],
            timeout=READY_TIMEOUT,
            describe=f"Kafka {self.version} ready on {self.bootstrap}",
            t0=t0,
        )
        if not self.detach:  # the proxy lives in this process: a detached broker has none
            try:
                self.proxy = KafkaProxy(self.proxied_port, self._proxy_port, self.host)
            except BaseException:
                self.stop()
                raise
        return self

    def _lists_topics(self) -> bool:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 2000})
        admin.list_topics(timeout=2)
        return True

    def _inits_transactions(self) -> bool:
        from confluent_kafka import Producer

        p = Producer({"bootstrap.servers": self.bootstrap, "transactional.id": "beam-devstack-ready"})
        p.init_transactions(10)
        return True

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        super().stop()


def _mib(size: str) -> int:
    units = {"k": 1 / 1024, "m": 1, "g": 1024}
    return int(float(size[:-1]) * units[size[-1].lower()])


def consume_all(bootstrap: str, topic: str, isolation: str = "read_committed") -> list:
    """Every message of a one-partition topic, up to its end (EOF at the last stable offset):
    what tests count delivered rows with (never the watermarks, which count transaction markers)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"t-{uuid.uuid4()}",
            "isolation.level": isolation,
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    c.assign([TopicPartition(topic, 0, 0)])
    out = []
    try:
        while True:
            m = c.poll(30)
            assert m is not None, f"no EOF on {topic} within 30s"
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    return out
                raise AssertionError(m.error())
            out.append(m)
    finally:
        c.close()
