"""What a destination may reach (docs/security.md): the real `beam-jobrunner transport` refuses
to connect a destination inward unless an administrator allows it, and quotes a remote answer
only as a short excerpt.

Every server here listens on loopback. Addresses outside loopback appear only in the pure
classification tests at the top, which make no connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
import uuid
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from jr_helpers import Job, expected_ids, managed, sns_topic_to_queue

from beam_jobrunner import reach
from beam_jobrunner.errors import PermanentError, excerpt

WINDOW = {"partition_key": "block", "start": 2000, "end": 2300}
HINT = "unless an administrator allows the host or CIDR (config.destination_allow, docs/security.md)"
NOBODY = {"BEAM_DESTINATION_ALLOW": ""}  # the default: nothing inward allowed


def spec(dest: dict) -> dict:
    return {
        "job_name": "t",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": WINDOW,
        "destinations": [dest],
    }


# --- the address classification (no connection is made) ---------------------------------------


@pytest.mark.parametrize(
    "address, why",
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("169.254.169.254", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("::ffff:127.0.0.1", "the IPv4-mapped IPv6 form of 127.0.0.1, a loopback address"),
        ("::ffff:169.254.169.254", "the IPv4-mapped IPv6 form of 169.254.169.254, a link-local address"),
        ("::127.0.0.1", "the IPv4-compatible IPv6 form of 127.0.0.1, a loopback address"),
        ("64:ff9b::169.254.169.254", "the NAT64 IPv6 form of 169.254.169.254, a link-local address"),
        ("2002:a00:1::", "the 6to4 IPv6 form of 10.0.0.1, a private address"),
        ("100.64.0.1", "a shared (carrier-grade NAT) address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fd12:3456::1", "a private (unique local) address"),
        ("224.0.0.251", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("255.255.255.255", "a broadcast address"),
        ("240.0.0.1", "a reserved address"),
        ("192.0.2.10", "an address that is not globally routable"),
    ],
)
def test_inward_addresses_are_refused_by_default(address, why):
    assert reach.Policy.parse().refusal(ipaddress.ip_address(address), 443) == why


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8", "151.101.1.69"])
def test_public_addresses_are_allowed(address):
    assert reach.Policy.parse().refusal(ipaddress.ip_address(address), 443) is None


def test_cluster_cidrs_are_refused_even_where_public_and_allow_entries_win():
    p = reach.Policy.parse("", "203.0.114.0/24, 2600:1f00::/32")
    cluster = "an address of the cluster's own ranges (BEAM_CLUSTER_CIDRS)"
    assert p.refusal(ipaddress.ip_address("203.0.114.7")) == cluster
    assert p.refusal(ipaddress.ip_address("::ffff:203.0.114.7")) == cluster
    assert p.refusal(ipaddress.ip_address("2600:1f00::5")) == cluster
    assert p.refusal(ipaddress.ip_address("203.0.115.7")) is None

    allowed = reach.Policy.parse("203.0.114.0/28,169.254.169.254/32,10.0.0.0/8", "203.0.114.0/24")
    assert allowed.refusal(ipaddress.ip_address("203.0.114.7")) is None  # over the cluster CIDR
    assert allowed.refusal(ipaddress.ip_address("203.0.114.99")) is not None
    assert allowed.refusal(ipaddress.ip_address("169.254.169.254")) is None
    assert allowed.refusal(ipaddress.ip_address("::ffff:10.9.9.9")) is None  # the mapped form too
    assert allowed.refusal(ipaddress.ip_address("169.254.169.253")) == "a link-local address"


def test_allow_entries_name_hosts_suffixes_and_cidrs():
    p = reach.Policy.parse(" Hooks.Internal. , *.svc.example.internal,10.0.0.0/8,fd00::/8,192.168.7.7 ")
    assert p.host_allowed("hooks.internal") and p.host_allowed("HOOKS.internal")
    assert p.host_allowed("a.svc.example.internal") and p.host_allowed("b.a.svc.example.internal")
    assert not p.host_allowed("svc.example.internal")  # a suffix pattern, not the name itself
    assert not p.host_allowed("evilhooks.internal") and not p.host_allowed("hooks.internal.evil.com")
    assert p.host_allowed("10.2.3.4") and p.host_allowed("192.168.7.7") and p.host_allowed("[fd00::1]")
    assert not p.host_allowed("192.168.7.8")
    for bad in ("http://x/", "a b", "*"):
        with pytest.raises(PermanentError, match="BEAM_DESTINATION_ALLOW entry"):
            reach.Policy.parse(bad)
    with pytest.raises(PermanentError, match="BEAM_CLUSTER_CIDRS entry 'nope' is not a CIDR"):
        reach.Policy.parse("", "nope")


Broker = namedtuple("Broker", "id host port")


def test_kafka_metadata_check_refuses_an_advertised_broker_inward():
    """The check of a cluster's advertised brokers, on IP literals (resolving one sends nothing)."""
    p = reach.Policy.parse("")
    with pytest.raises(PermanentError) as e:
        reach.check_kafka_brokers("kafka destination 't' chunk 0", [Broker(1, "169.254.169.254", 9092)], p)
    assert str(e.value).startswith(
        "kafka destination 't' chunk 0: refused to connect to advertised broker 1 169.254.169.254:9092: "
        "a link-local address; destinations may not reach"
    )
    reach.check_kafka_brokers("k", [Broker(1, "8.8.8.8", 9092)], p)  # public: fine
    allowed = reach.Policy.parse("169.254.169.254/32")
    reach.check_kafka_brokers("k", [Broker(1, "169.254.169.254", 9092)], allowed)
    # A tenant may not name the managed Kafka's endpoints (its topics are <namespace>.<name>, which
    # a bare name would bypass); another port of that host is just a private address.
    platform = reach.Policy.parse("", "", (), [("10.0.0.5", 9092)])
    with pytest.raises(PermanentError, match=r"bootstrap_servers 10.0.0.5:9092 is the operator's managed Kafka"):
        reach.check_kafka_bootstrap("k", "10.0.0.5:9092", platform)
    for spelling in ("167772165:9092", "0x0a000005:9092", "[::ffff:10.0.0.5]:9092", "10.0.5:9092"):
        with pytest.raises(PermanentError, match=r"is the operator's managed Kafka"):
            reach.check_kafka_bootstrap("k", spelling, platform)
    with pytest.raises(PermanentError, match=r"bootstrap server 10.0.0.5:9093: a private address"):
        reach.check_kafka_bootstrap("k", "10.0.0.5:9093", platform)
    assert reach.kafka_bootstrap("SASL_SSL://a.b:9093, [::1]:19092,c") == [("a.b", 9093), ("::1", 19092), ("c", 9092)]


def test_a_remote_answer_is_quoted_as_a_short_sanitized_excerpt():
    assert excerpt("unknown tenant") == "unknown tenant"
    assert excerpt(b"line one\r\n\tline\x00two\x1b[31m") == "line one line two [31m"
    long = excerpt("x" * 10_000)
    assert long == "x" * 200 + "... [truncated to 200 characters]"


# --- the real worker against real servers on loopback -------------------------------------------


class CountingReceiver:
    """An HTTP server on 127.0.0.1 that counts POSTs and answers `status` with `body`: no signature
    check, unlike test_jobrunner_sinks.Receiver, since what is tested here is whether it is reached."""

    def __init__(self, status: int = 200, body: bytes = b"{}") -> None:
        self.requests = 0
        self.rows: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests += 1
                if status < 300:
                    outer.rows.extend(json.loads(data)["rows"])
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = CountingReceiver()
    yield r
    r.close()


def _refused(r, label: str, where: str, why: str) -> None:
    assert r.code == 2, (r.code, r.message, r.stderr[-2000:])
    assert r.message == f"{label}: refused to connect to {where}: {why}; destinations may not reach loopback, " + (
        f"link-local, private, multicast or cluster addresses {HINT}"
    ), r.message
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_a_webhook_on_loopback_is_refused_unless_allowed(tmp_path, source, bucket, gcs, rows, receiver):
    url = f"http://127.0.0.1:{receiver.port}/hook?token=abc"
    job = Job(tmp_path, spec({"type": "webhook", "name": "hooks", "url": url}), snowflake=source, gcs=gcs)
    job.stage()
    r = job.transport(0, **NOBODY)
    _refused(r, "webhook destination 'hooks' chunk 0", f"127.0.0.1:{receiver.port}", "a loopback address")
    assert receiver.requests == 0
    assert "token=abc" not in r.message + r.stderr

    ok = job.transport(0, BEAM_DESTINATION_ALLOW="127.0.0.0/8")
    assert ok.code == 0, ok.message
    assert receiver.requests > 0 and {x["unique_id"] for x in receiver.rows} <= set(expected_ids(rows))


def test_a_webhook_named_localhost_is_refused_after_resolution_unless_the_name_is_allowed(
    tmp_path, source, bucket, gcs, receiver
):
    url = f"http://localhost:{receiver.port}/hook"
    job = Job(tmp_path, spec({"type": "webhook", "name": "hooks", "url": url}), snowflake=source, gcs=gcs)
    job.stage()
    r = job.transport(0, **NOBODY)
    assert r.code == 2, r.message
    assert r.message.startswith("webhook destination 'hooks' chunk 0: refused to connect to localhost:"), r.message
    assert "a loopback address" in r.message and HINT in r.message
    assert receiver.requests == 0

    by_name = job.transport(0, BEAM_DESTINATION_ALLOW="LocalHost")
    assert by_name.code == 0, by_name.message
    assert receiver.requests > 0
    # Another name of the same address is not that name.
    other = Job(
        tmp_path,
        spec({"type": "webhook", "name": "hooks", "url": f"http://127.0.0.1:{receiver.port}/hook"}),
        snowflake=source,
        gcs=gcs,
    )
    other.stage()
    before = receiver.requests
    r = other.transport(0, BEAM_DESTINATION_ALLOW="localhost,*.localhost")
    assert r.code == 2 and "refused to connect to 127.0.0.1:" in r.message, r.message
    assert receiver.requests == before


def test_a_nats_server_on_loopback_is_refused_unless_allowed(tmp_path, source, bucket, gcs, nats, rows):
    import nats as nats_py

    subject = f"reach.{uuid.uuid4().hex[:8]}"
    url = nats.endpoints()["url"]
    assert url.startswith("nats://127.0.0.1:")  # an IP literal: asyncio never calls getaddrinfo

    async def make_stream():
        nc = await nats_py.connect(url)
        await nc.jetstream().add_stream(name=subject.replace(".", "_"), subjects=[subject])
        await nc.close()

    async def count():
        nc = await nats_py.connect(url)
        info = await nc.jetstream().stream_info(subject.replace(".", "_"))
        await nc.close()
        return info.state.messages

    asyncio.run(make_stream())
    job = Job(tmp_path, spec({"type": "nats", "name": subject, "url": url}), snowflake=source, gcs=gcs)
    job.stage()
    r = job.transport(0, **NOBODY)
    _refused(r, f"nats destination {subject!r} chunk 0", url.removeprefix("nats://"), "a loopback address")
    assert asyncio.run(count()) == 0

    ok = job.transport(0, BEAM_DESTINATION_ALLOW="127.0.0.0/8")
    assert ok.code == 0, ok.message
    assert asyncio.run(count()) == ok.json["destinations"][0]["rows"] > 0


def test_an_sns_endpoint_on_loopback_is_refused_unless_allowed(tmp_path, source, bucket, gcs, sns):
    sqs_c = sns.client("sqs")
    arn, q = sns_topic_to_queue(sns)
    endpoint = sns.endpoints()["url"]
    assert endpoint.startswith("http://127.0.0.1:")
    job = Job(
        tmp_path,
        spec({"type": "sns", "name": "sns", "topic_arn": arn, "endpoint_url": endpoint, "secret": "aws"}),
        snowflake=source,
        gcs=gcs,
        extra={"BEAM_DEST_0_AWS_ACCESS_KEY_ID": "testing", "BEAM_DEST_0_AWS_SECRET_ACCESS_KEY": "testing"},
    )
    job.stage()
    r = job.transport(0, **NOBODY)
    _refused(r, "sns destination 'sns' chunk 0", endpoint.removeprefix("http://").rstrip("/"), "a loopback address")
    waiting = sqs_c.get_queue_attributes(QueueUrl=q, AttributeNames=["ApproximateNumberOfMessages"])
    assert waiting["Attributes"]["ApproximateNumberOfMessages"] == "0"

    ok = job.transport(0, BEAM_DESTINATION_ALLOW="127.0.0.1/32")
    assert ok.code == 0, ok.message
    waiting = sqs_c.get_queue_attributes(QueueUrl=q, AttributeNames=["ApproximateNumberOfMessages"])
    assert int(waiting["Attributes"]["ApproximateNumberOfMessages"]) == ok.json["destinations"][0]["rows"] > 0


def _topics(kafka) -> set[str]:
    from confluent_kafka.admin import AdminClient

    return set(AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics)


def test_a_kafka_bootstrap_on_loopback_is_refused_before_any_connection(tmp_path, source, bucket, gcs, kafka):
    from beam_devstack.substrate.kafka import consume_all

    topic = f"reach-{uuid.uuid4().hex[:8]}"
    assert kafka.bootstrap.startswith("127.0.0.1:")
    dest = {"type": "kafka", "name": topic, "bootstrap_servers": kafka.bootstrap}
    # Not the managed Kafka (no BEAM_KAFKA_BOOTSTRAP): the tenant's own cluster.
    job = Job(tmp_path, spec(dest), snowflake=source, gcs=gcs)
    job.stage()
    r = job.transport(0, **NOBODY)
    _refused(r, f"kafka destination {topic!r} chunk 0", f"bootstrap server {kafka.bootstrap}", "a loopback address")
    assert topic not in _topics(kafka)  # no metadata request made it there, let alone a produce

    ok = job.transport(0, BEAM_DESTINATION_ALLOW="127.0.0.0/8")
    assert ok.code == 0, ok.message
    assert len(consume_all(kafka.bootstrap, topic)) == ok.json["destinations"][0]["rows"] > 0


def test_a_kafka_cluster_advertising_a_broker_inward_is_refused_before_any_produce(
    tmp_path, source, bucket, gcs, kafka
):
    """The bootstrap name is allowed (`localhost`), but the broker the cluster advertises,
    127.0.0.1, is not: the real broker's metadata is checked before anything is produced."""
    from beam_devstack.substrate.kafka import consume_all

    topic = f"reach-{uuid.uuid4().hex[:8]}"
    port = kafka.bootstrap.rsplit(":", 1)[1]
    dest = {"type": "kafka", "name": topic, "bootstrap_servers": f"localhost:{port}"}
    job = Job(tmp_path, spec(dest), snowflake=source, gcs=gcs)
    job.stage()
    r = job.transport(0, BEAM_DESTINATION_ALLOW="localhost")
    assert r.code == 2, (r.message, r.stderr[-2000:])
    assert r.message.startswith(
        f"kafka destination {topic!r} chunk 0: refused to connect to advertised broker 1 127.0.0.1:{port}: "
        "a loopback address; destinations may not reach"
    ), r.message
    if topic in _topics(kafka):  # the metadata request may have created it: empty, then
        assert consume_all(kafka.bootstrap, topic) == []

    ok = job.transport(0, BEAM_DESTINATION_ALLOW="localhost,127.0.0.1/32")
    assert ok.code == 0, ok.message


def test_the_platforms_own_endpoints_need_no_allow_entry(tmp_path, source, bucket, gcs, kafka):
    """The managed Kafka (BEAM_KAFKA_BOOTSTRAP) and the staging emulator are on loopback here."""
    from beam_devstack.substrate.kafka import consume_all

    topic = f"reach-{uuid.uuid4().hex[:8]}"
    job = Job(tmp_path, spec({"type": "kafka", "name": topic}), snowflake=source, gcs=gcs, kafka=kafka)
    job.stage()
    r = job.transport(0, **NOBODY)
    assert r.code == 0, r.message
    assert len(consume_all(kafka.bootstrap, managed(topic))) == r.json["destinations"][0]["rows"] > 0
    # Naming the managed Kafka as a bootstrap server would write the bare topic name, into any
    # organization's <namespace>.<name>: refused, before any connection.
    other_orgs = f"other-org.{topic}"
    dest = {"type": "kafka", "name": other_orgs, "bootstrap_servers": kafka.bootstrap}
    job = Job(tmp_path, spec(dest), snowflake=source, gcs=gcs, kafka=kafka)
    job.stage()
    r = job.transport(0, **NOBODY)
    assert r.code == 2, r.message
    assert f"bootstrap_servers {kafka.bootstrap} is the operator's managed Kafka" in r.message, r.message
    assert other_orgs not in _topics(kafka)


def test_the_managed_kafka_under_any_other_spelling_is_refused_before_any_row(tmp_path, source, bucket, gcs, kafka):
    """Another organization's topics on the managed Kafka are <their namespace>.<name>; a tenant
    who reaches that Kafka through bootstrap_servers writes the bare name, so each spelling of
    it must be refused, even where loopback itself is allowed, and the topic stays empty."""
    from beam_devstack.substrate.kafka import consume_all

    port = int(kafka.bootstrap.rsplit(":", 1)[1])
    assert kafka.bootstrap == f"127.0.0.1:{port}"
    victim = f"org-a.{uuid.uuid4().hex[:8]}"
    sasl = kafka.sasl_ssl_client_config()
    spellings = {
        "a short IP": f"127.1:{port}",
        "a decimal IP": f"2130706433:{port}",
        "a hex IP": f"0x7f000001:{port}",
        "an IPv4-mapped IPv6 address": f"[::ffff:127.0.0.1]:{port}",
        "a name that resolves to it": f"LocalHost.:{port}",
        "a librdkafka protocol prefix": f"PLAINTEXT://127.0.0.1:{port}",
        "another listener of the same cluster": kafka.sasl_ssl_bootstrap,
    }
    secret_env = {
        "BEAM_DEST_0_SASL_USERNAME": sasl["sasl.username"],
        "BEAM_DEST_0_SASL_PASSWORD": sasl["sasl.password"],
        "BEAM_DEST_0_SSL_CA_PEM": sasl["ssl.ca.pem"],
        "BEAM_DEST_0_ENDPOINTS": kafka.sasl_ssl_bootstrap,  # the credentials may go there: not why it is refused
    }
    job = Job(tmp_path, spec({"type": "kafka", "name": victim}), snowflake=source, gcs=gcs, kafka=kafka)
    job.stage()  # once: the staged chunks do not depend on the destinations
    for what, bootstrap in spellings.items():
        dest = {"type": "kafka", "name": victim, "bootstrap_servers": bootstrap}
        extra = {}
        if bootstrap == kafka.sasl_ssl_bootstrap:
            dest["secret"] = "tenant-kafka"
            extra = secret_env
        allow = "127.0.0.0/8,::1/128,localhost"
        r = job.transport(0, BEAM_SPEC=json.dumps(spec(dest)), BEAM_DESTINATION_ALLOW=allow, **extra)
        assert r.code == 2, (what, r.code, r.message, r.stderr[-2000:])
        assert "is the operator's managed Kafka; omit bootstrap_servers" in r.message, (what, r.message)
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if victim in _topics(kafka):  # another listener's metadata request may have created it: empty
        assert consume_all(kafka.bootstrap, victim) == []


def test_an_error_answer_is_quoted_only_as_a_short_excerpt(tmp_path, source, bucket, gcs):
    secret = "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    page = "Internal\r\nServer\x00Error\x1b[0m at db-primary.internal:5432 " + "stack frame; " * 30
    body = (page + secret + "\n" + "x" * 10_000)[:10_240].encode()
    recv = CountingReceiver(500, body)
    try:
        url = f"http://127.0.0.1:{recv.port}/hook"
        job = Job(
            tmp_path,
            spec({"type": "webhook", "name": "hooks", "url": url}),
            snowflake=source,
            gcs=gcs,
            extra={"BEAM_WEBHOOK_ATTEMPTS": "2"},
        )
        job.stage()
        r = job.transport(0)
        assert r.code == 3, r.message
        quoted = r.message.split("HTTP 500: ", 1)[1]
        assert quoted == excerpt(page + secret)[:200] + "... [truncated to 200 characters]", quoted
        assert quoted.startswith("Internal Server Error [0m at db-primary.internal:5432 stack frame;")
        assert secret not in r.message + r.stderr and "wJalrXUtnFEMI" not in r.message + r.stderr
        assert len(r.message) < 600 and not any(c in r.message for c in "\r\n\x00\x1b")
    finally:
        recv.close()


def test_a_receiver_echoing_the_secret_in_any_form_never_gets_it_into_the_message_or_the_log(
    tmp_path, source, bucket, gcs
):
    """The webhook's signing key, as `kubectl create secret --from-file` stores it (a trailing
    newline, here also a tab and two spaces), echoed by a failing receiver in every form a
    text can carry it: as written, whitespace collapsed, URL-, JSON-, hex- and base64-encoded
    (at each offset), and placed where the 200- and 300-character cuts fall. The 500 is
    retried and logged each time; neither the log nor the termination message (what becomes
    status.error_message and the WorkerLog Event) holds any 8 characters of it."""
    import base64
    from urllib.parse import quote, quote_plus

    value = "Sig-Key\twith  spaces-0123456789abcdef"
    raw = value.encode()
    forms = [
        value,
        " ".join(value.split()),
        quote(value + "\n", safe=""),
        quote_plus(value),
        json.dumps(value + "\n"),
        raw.hex(),
        base64.b64encode(raw).decode(),
        base64.b64encode(b"k=" + raw).decode(),
        base64.urlsafe_b64encode(b"k" + raw + b"\n").decode(),
    ]
    bodies = {
        "every form": ("echo: " + " | ".join(forms)).encode(),
        "across the excerpt's cut": ("z" * 185 + value).encode(),
        "across the log line's cut": ("z" * 250 + " ".join(value.split())).encode(),
    }
    dest = {"type": "webhook", "name": "hooks", "url": "http://127.0.0.1:9/hook", "hash_key": "hook-key"}
    job = Job(tmp_path, spec(dest), snowflake=source, gcs=gcs, extra={"BEAM_DEST_0_HASH_KEY": value + "\n"})
    job.stage()  # once: the staged chunks do not depend on where they go
    for what, body in bodies.items():
        recv = CountingReceiver(500, body)
        try:
            echoing = spec({**dest, "url": f"http://127.0.0.1:{recv.port}/hook"})
            r = job.transport(0, BEAM_SPEC=json.dumps(echoing), BEAM_WEBHOOK_ATTEMPTS="2")
            assert r.code == 3 and "HTTP 500: " in r.message, (what, r.message)
            assert recv.requests == 2, what
            seen = r.termination + r.stderr
            leaks = {value[i : i + 8] for i in range(len(value) - 7)} | set(forms)
            leaks |= {f[i : i + 12] for f in forms for i in range(len(f) - 11)}
            found = sorted(x for x in leaks if x in seen)
            assert not found, (what, found, seen[-3000:])
        finally:
            recv.close()
    # Too short to be masked without masking ordinary words: refused, naming the key only.
    r = job.transport(0, BEAM_DEST_0_HASH_KEY="ab1\n")
    assert r.code == 2 and "secret key hash_key is shorter than 4 characters" in r.message, r.message
    assert "ab1" not in r.message


class Listener:
    """A TCP server on 127.0.0.1 that only counts connections: a server someone who may create
    backfills points a destination at, to collect the credentials of a Secret they cannot read."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_a_destination_secret_is_sent_only_to_the_endpoints_it_names(tmp_path, source, bucket, gcs):
    """Kafka SASL PLAIN and NATS send credentials in clear to the server the spec names. A
    Secret names where they may go (its key `endpoints`); anywhere else, and with no such key,
    the worker refuses before it connects (the default; an administrator may turn the latter
    off: config.secret_endpoints_required)."""
    thief = Listener()
    try:
        at = f"127.0.0.1:{thief.port}"
        kafka_creds = {"BEAM_DEST_0_SASL_USERNAME": "tenant-a", "BEAM_DEST_0_SASL_PASSWORD": "pw-of-tenant-a"}
        cases = {
            "kafka": ({"type": "kafka", "name": "t", "bootstrap_servers": at, "secret": "kafka-creds"}, kafka_creds),
            "nats": (
                {"type": "nats", "name": "s", "url": f"nats://{at}", "secret": "nats-creds"},
                {"BEAM_DEST_0_TOKEN": "token-of-tenant-a"},
            ),
        }
        for kind, (dest, creds) in cases.items():
            job = Job(tmp_path, spec(dest), snowflake=source, gcs=gcs)
            job.stage()
            label = f"{kind} destination {dest['name']!r} chunk 0"
            bound = {**creds, "BEAM_DEST_0_ENDPOINTS": "kafka.example.com:9093,*.nats.example.com:4222"}
            r = job.transport(0, **bound)
            assert r.code == 2, (kind, r.message)
            assert r.message.startswith(f"{label}: Secret '{dest['secret']}' is for kafka.example.com:9093,"), r.message
            assert f"not {'bootstrap server' if kind == 'kafka' else 'server'} 127.0.0.1:{thief.port}" in r.message
            r = job.transport(0, **creds)
            assert r.code == 2 and "does not say which endpoints its credentials are for" in r.message, r.message
            assert thief.connections == 0, kind
            # Widened by the administrator: the worker connects (and would send them).
            job.transport(0, BEAM_SECRET_ENDPOINTS_REQUIRED="false", BEAM_CONNECT_TIMEOUT_S="2", **creds)
            assert thief.connections > 0, kind
            thief.connections = 0
    finally:
        thief.close()


def test_a_short_refusal_answer_is_quoted_whole(tmp_path, source, bucket, gcs):
    recv = CountingReceiver(400, b"unknown tenant")
    try:
        job = Job(
            tmp_path,
            spec({"type": "webhook", "name": "hooks", "url": f"http://127.0.0.1:{recv.port}/beam"}),
            snowflake=source,
            gcs=gcs,
        )
        job.stage()
        r = job.transport(0)
        assert r.code == 2
        assert r.message.endswith(f"http://127.0.0.1:{recv.port}/beam answered HTTP 400: unknown tenant"), r.message
        assert recv.requests == 1
    finally:
        recv.close()
