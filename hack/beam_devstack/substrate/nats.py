"""NATS server with JetStream (Debian's nats-server package) on 127.0.0.1."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

from beam_devstack.substrate.proc import ManagedProcess, apt_install, free_port, progress, start_ready

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


class Nats:
    def __init__(self, run_dir: Path, *, detach: bool = False, pid_dir: Path | None = None) -> None:
        self.run_dir = Path(run_dir) / "nats"
        self.detach = detach
        self.pid_dir = pid_dir
        self.port: int | None = None
        self.monitor_port: int | None = None
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def endpoints(self) -> dict:
        return {"url": self.url}

    def start(self) -> Nats:
        binary = ensure_installed()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port, self.monitor_port = free_port(), free_port()
        self.proc = start_ready(
            "nats-server",
            [
                binary,
                "-js",
                "-a",
                "127.0.0.1",
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
            log_path=self.run_dir / "stdout.log",
            checks=[(self._jetstream_ready, "serving JetStream")],
            timeout=READY_TIMEOUT,
            component="nats",
            describe=f"nats-server ready on {self.url}",
            detach=self.detach,
            pid_dir=self.pid_dir,
        )
        return self

    def _jetstream_ready(self) -> bool:
        # /healthz?js-enabled-only=true answers 200 only once JetStream is up.
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
