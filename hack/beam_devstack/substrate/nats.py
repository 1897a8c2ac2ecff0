"""NATS server with JetStream (Debian's nats-server package) on 127.0.0.1."""

from __future__ import annotations

import shutil
from pathlib import Path

from beam_devstack.substrate.proc import Server, apt_install, free_port, progress

READY_TIMEOUT = 30.0


def ensure_installed() -> str:
    found = shutil.which("nats-server") or (Path("/usr/sbin/nats-server").exists() and "/usr/sbin/nats-server")
    if found:
        return found
    apt_install("nats-server", "nats")
    # Debian's package enables a system service; on machines with systemd it would hold port 4222.
    # Ours run on free ports, so the service is left as Debian set it up.
    found = shutil.which("nats-server") or "/usr/sbin/nats-server"
    progress("nats", f"installed {found}")
    return found


class Nats(Server):
    component = "nats"
    monitor_port: int | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def endpoints(self) -> dict:
        return {"url": self.url}

    def start(self) -> Nats:
        binary = ensure_installed()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port, self.monitor_port = free_port(), free_port()
        self._start(
            "nats-server",
            [
                binary,
                "-js",
                "-a",
                self.host,
                "-p",
                self.port,
                "-sd",
                self.run_dir / "js",
                # The monitoring port gives a readiness probe that also reports JetStream's state.
                "-m",
                self.monitor_port,
                "-l",
                self.run_dir / "nats-server.log",
            ],
            log="stdout.log",
            # The monitoring port's /healthz?js-enabled-only=true answers 200 only once JetStream is up.
            url=f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true",
            ready="serving JetStream",
            timeout=READY_TIMEOUT,
            describe=f"nats-server ready on {self.url}",
        )
        return self
