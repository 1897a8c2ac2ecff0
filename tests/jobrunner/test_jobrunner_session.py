"""What the staging worker asks of its Snowflake session, seen on the wire in front of fakesnow.

fakesnow pins its DuckDB to UTC and ignores TIMEZONE, so the shift itself (a TIMESTAMP_LTZ
window read in the account's zone) cannot be shown here; what can be shown is that the worker's
login asks for a UTC session, which is what a real Snowflake acts on. A relay between the real
connector and the real fakesnow server records each login request's body.
"""

from __future__ import annotations

import gzip
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from jr_helpers import Job

from beam_contract.model import BackfillSpec


class _Relay(BaseHTTPRequestHandler):
    upstream = ""
    logins: list[dict] = []

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/session/v1/login-request"):
            raw = gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body
            type(self).logins.append(json.loads(raw))
        req = urllib.request.Request(self.upstream + self.path, data=body or None, method=self.command)
        for k, v in self.headers.items():
            if k.lower() not in ("host", "content-length", "connection"):
                req.add_header(k, v)
        with urllib.request.urlopen(req, timeout=60) as answer:
            payload = answer.read()
            self.send_response(answer.status)
            for k, v in answer.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = do_GET = _forward

    def log_message(self, *a):
        pass


@pytest.fixture
def relay(snowflake):
    sf = snowflake.endpoints()
    _Relay.upstream = f"http://{sf['host']}:{sf['port']}"
    _Relay.logins = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Relay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_the_staging_session_is_utc_whatever_the_accounts_time_zone(tmp_path, snowflake, gcs, bucket, source, relay):
    spec = BackfillSpec.model_validate(
        {
            "job_name": "tz",
            "table": "base.assets.erc20_token_transfers",
            "backfill_window": {
                "partition_key": "block_timestamp",
                "start": "2024-01-01T00:00:00",
                "end": "2024-01-02T00:00:00",
            },
            "destinations": [{"type": "kafka", "name": "tz"}],
        }
    ).model_dump(mode="json", exclude_none=True)
    job = Job(tmp_path, spec, snowflake=snowflake, gcs=gcs)
    result = job.stage(BEAM_SNOWFLAKE_HOST="127.0.0.1", BEAM_SNOWFLAKE_PORT=relay.server_port).json
    assert result["num_rows"] > 0, result
    assert _Relay.logins, "the worker never logged in through the relay"
    for login in _Relay.logins:
        assert login["data"]["SESSION_PARAMETERS"].get("TIMEZONE") == "UTC", login["data"]["SESSION_PARAMETERS"]
