"""Amazon SNS (and SQS, to read deliveries back) from moto's server mode on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from beam_devstack.substrate.proc import Server, free_port, progress

REGION = "us-east-1"
READY_TIMEOUT = 60.0
# moto accepts any credentials; boto3 refuses to sign a request without some.
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def ensure_installed() -> None:
    if importlib.util.find_spec("moto.server") is None or importlib.util.find_spec("flask") is None:
        progress("sns", "installing moto[server] from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "moto[server]>=5"], check=True)
        importlib.invalidate_caches()


class Sns(Server):
    component = "sns"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def endpoints(self) -> dict:
        return {"url": self.url, "region": REGION}

    def client(self, service: str = "sns"):
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name=REGION, **CREDENTIALS)

    def start(self) -> Sns:
        ensure_installed()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._start(
            "moto-server",
            # The interpreter that runs us has moto; a bare `moto_server` on PATH may be another.
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", self.port],
            log="moto.log",
            url=f"{self.url}/moto-api/data.json",  # moto's own API: a cheap GET that needs no AWS signing
            ready="answering",
            timeout=READY_TIMEOUT,
            describe=f"moto (SNS, SQS) ready on {self.url}",
        )
        return self
