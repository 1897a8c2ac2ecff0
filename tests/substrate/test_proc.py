"""ManagedProcess keeps what the stack relies on: the log, the pid file, readiness through its
probe, errors that carry the end of the log, a stop that reaches the whole process group; and node.py reads a Node through the kubernetes client with client certificates.
None of it needs a cluster or a node: small local processes and a TLS server in this process."""

from __future__ import annotations

import http.server
import json
import os
import signal
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest

from beam_devstack.substrate import pki
from beam_devstack.substrate.node import read_node
from beam_devstack.substrate.proc import ManagedProcess, free_port, start_ready


def _gone(pgid: int) -> bool:
    """No live (non-zombie) process is left in the process group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return False
    return True


def test_a_server_probed_over_http_is_ready_recorded_and_stopped_with_its_group(tmp_path, capsys):
    port = free_port()
    # A child of the server in its process group: stop() must reach it too.
    script = (
        "import subprocess, http.server as h; subprocess.Popen(['sleep', '300']); "
        f"h.test(h.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')"
    )
    proc = start_ready(
        "web",
        [sys.executable, "-c", script],
        log_path=tmp_path / "web.log",
        url=f"http://127.0.0.1:{port}/",
        ready="serving",
        timeout=30,
        component="test",
        describe="web ready",
        pid_dir=tmp_path / "pids",
        env={**os.environ, "BEAM_PROBE": "1"},
    )
    pid = proc.pid
    assert (tmp_path / "pids" / "web.pid").read_text() == str(pid)
    assert "web ready in " in capsys.readouterr().err
    environ = dict(e.split("=", 1) for e in open(f"/proc/{pid}/environ").read().split("\0") if "=" in e)
    assert environ["BEAM_PROBE"] == "1"
    assert set(environ) == set(os.environ) | {"BEAM_PROBE"}  # the exact environment given
    assert os.getpgid(pid) == pid  # a session and group of its own
    proc.stop(grace=5)
    assert not proc.alive()
    assert _gone(pid)
    assert not (tmp_path / "pids" / "web.pid").exists()
    assert "GET / " in (tmp_path / "web.log").read_text()  # the probe's request, in the server's log


@pytest.mark.parametrize(
    "code, timeout, error, message",
    [
        # Exit code 0 counts too: a server that quits is not ready, whatever its code.
        (
            "print('no config here'); raise SystemExit(0)",
            30,
            RuntimeError,
            "exited with code 0 before it was listening",
        ),
        (
            "print('no config here', flush=True); import time; time.sleep(300)",
            2,
            TimeoutError,
            "not listening after 2s",
        ),
    ],
    ids=["exits", "times-out"],
)
def test_a_server_that_is_not_ready_fails_with_the_end_of_its_log_and_is_stopped(
    tmp_path, code, timeout, error, message
):
    with pytest.raises(error) as e:
        start_ready(
            "server",
            [sys.executable, "-c", code],
            log_path=tmp_path / "server.log",
            tcp=("127.0.0.1", free_port()),
            ready="listening",
            timeout=timeout,
            component="test",
            describe="never",
            pid_dir=tmp_path / "pids",
        )
    assert f"server {message}" in str(e.value)
    assert "no config here" in str(e.value)
    assert list((tmp_path / "pids").glob("*.pid")) == []


def test_stop_kills_a_group_that_ignores_sigterm_after_the_grace(tmp_path):
    proc = ManagedProcess(
        "stubborn",
        ["sh", "-c", "trap '' TERM; sleep 300 & wait"],
        log_path=tmp_path / "stubborn.log",
    ).start()
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.stop(grace=1)
    assert 0.9 < time.monotonic() - t0 < 10
    assert _gone(proc.pid)
    assert proc.popen.returncode == -signal.SIGKILL


def test_read_node_uses_the_users_client_certificate_and_trusts_the_ca(tmp_path):
    ca, ca_key = pki.make_ca(tmp_path / "ca", "test-ca")
    crt, key = pki.issue_cert(tmp_path / "server", ca, ca_key, "apiserver", server=True, ips=("127.0.0.1",))
    pki.issue_cert(tmp_path / "kubelet", ca, ca_key, "system:node:n1", org="system:nodes")
    seen = {}

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen["path"] = self.path
            seen["user"] = dict(x[0] for x in self.request.getpeercert()["subject"])["commonName"]
            body = json.dumps(
                {
                    "kind": "Node",
                    "metadata": {"name": "n1"},
                    "status": {"conditions": [{"type": "Ready", "status": "True"}], "images": []},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    ctx.load_cert_chain(str(crt), str(key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # pki.make_ca wrote tmp_path/ca.crt, issue_cert tmp_path/kubelet.crt and .key: node.py's layout.
        node = read_node(f"https://127.0.0.1:{server.server_port}", tmp_path, "kubelet", "n1")
    finally:
        server.shutdown()
        server.server_close()
    assert node["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    assert seen == {"path": "/api/v1/nodes/n1", "user": "system:node:n1"}
