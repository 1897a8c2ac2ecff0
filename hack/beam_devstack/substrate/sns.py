"""Amazon SNS (and SQS, to read deliveries back) from moto's server mode on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import urllib.request
from pathlib import Path

from beam_devstack.substrate.proc import ManagedProcess, free_port, progress, start_ready

REGION = "us-east-1"
READY_TIMEOUT = 60.0
# moto accepts any credentials; boto3 refuses to sign a request without some.
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def ensure_installed() -> None:
    if importlib.util.find_spec("moto.server") is None or importlib.util.find_spec("flask") is None:
        progress("sns", "installing moto[server] from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "moto[server]>=5"], check=True)
        importlib.invalidate_caches()


class Sns:
    def __init__(self, run_dir: Path, *, detach: bool = False, pid_dir: Path | None = None) -> None:
        self.run_dir = Path(run_dir) / "sns"
        self.detach = detach
        self.pid_dir = pid_dir
        self.port: int | None = None
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoints(self) -> dict:
        return {"url": self.url, "region": REGION}

    def client(self, service: str = "sns"):
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name=REGION, **CREDENTIALS)

    def start(self) -> Sns:
        ensure_installed()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = start_ready(
            "moto-server",
            # The interpreter that runs us has moto; a bare `moto_server` on PATH may be another.
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", self.port],
            log_path=self.run_dir / "moto.log",
            checks=[(self._answers, "answering")],
            timeout=READY_TIMEOUT,
            component="sns",
            describe=f"moto (SNS, SQS) ready on {self.url}",
            detach=self.detach,
            pid_dir=self.pid_dir,
        )
        return self

    def _answers(self) -> bool:
        # moto's own API: a cheap GET that needs no AWS signing.
        with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=2) as r:
            return r.status == 200

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
