"""Start and stop local server processes so that none outlives its owner.

Every server of the dev stack and the test suite is a ManagedProcess. Two guarantees:
- A process started for tests dies with the Python process that started it, even when that one
  is killed with SIGKILL: the child is asked for PR_SET_PDEATHSIG, and it runs in its own
  process group so that stop() reaches its children too (Kafka's JVM, fakesnow's workers).
- A process started by `beam-dev up` is detached (it must outlive the CLI) and is recorded in a
  pid file under the stack's run directory, so that `beam-dev down` finds it again.

mirakuru was tried for this and is not used: docs/development.md, "hack/: kept libraries and our
own code", says why.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("BEAM_CACHE", Path.home() / ".cache" / "beam-backfill"))
PR_SET_PDEATHSIG = 1

_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()


def progress(component: str, message: str) -> None:
    """One progress line on stderr; long downloads and builds call this so people see motion."""
    print(f"[{time.strftime('%H:%M:%S')} {component}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def http_ok(url: str, timeout: float = 2.0, *, verify: bool = True) -> bool:
    """Whether a GET of `url` answers 2xx: a server's readiness probe. verify=False for a
    self-signed HTTPS endpoint whose certificate the probe does not hold."""
    ctx = None if verify or not url.startswith("https://") else ssl._create_unverified_context()  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError):
        return False


class ManagedProcess:
    """url: a plain-HTTP URL that answers 2xx to GET once the server is ready; tcp: a (host, port)
    it listens on. Either makes `probe` for wait_ready."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        detach: bool = False,
        pid_dir: Path | None = None,
        url: str | None = None,
        tcp: tuple[str, int] | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.detach = detach
        self.pid_dir = pid_dir
        self.url, self.tcp = url, tcp
        self.popen: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=None if self.detach else _die_with_parent,
            )
        if self.pid_dir is not None:
            self.pid_dir.mkdir(parents=True, exist_ok=True)
            (self.pid_dir / f"{self.name}.pid").write_text(str(self.popen.pid))
        if not self.detach:
            with _live_lock:
                _live.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def probe(self) -> bool:
        """The readiness check of `url` or `tcp`."""
        if self.url is not None:
            return http_ok(self.url)
        assert self.tcp is not None, f"{self.name}: no url or tcp to probe"
        host, port = self.tcp
        return port_open(port, host)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def wait_ready(self, check: Callable[[], bool], timeout: float, what: str = "ready") -> None:
        """Poll check() until true; fail fast with the log tail if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with code {self.popen.returncode} before it was {what}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if check():
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not {what} after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        if self.popen is None:
            return
        kill_group(self.popen.pid, grace, self.popen)
        with _live_lock:
            _live.discard(self)
        if self.pid_dir is not None:
            (self.pid_dir / f"{self.name}.pid").unlink(missing_ok=True)


def start_ready(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    ready: str,
    url: str | None = None,
    tcp: tuple[str, int] | None = None,
    checks: Sequence[tuple[Callable[[], bool], str]] = (),
    timeout: float,
    component: str,
    describe: str,
    detach: bool = False,
    pid_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    grace: float = 10.0,
    t0: float | None = None,
) -> ManagedProcess:
    """Start a server, wait until the probe of `url` (http_ok) or `tcp` (port_open) passes (`ready` says what that
    means), then each further check in turn; on any failure (or interrupt) stop it before raising,
    so a half-started server is never left behind. Prints `<describe> in <seconds>` (since t0,
    by default the start) when ready."""
    assert url or tcp, f"{name}: start_ready probes a url or a tcp port first"
    t0 = time.monotonic() if t0 is None else t0
    proc = ManagedProcess(name, argv, log_path=log_path, env=env, detach=detach, pid_dir=pid_dir, url=url, tcp=tcp)
    try:
        proc.start()
        for check, what in [(proc.probe, ready), *checks]:
            proc.wait_ready(check, timeout, what)
    except BaseException:
        proc.stop(grace)
        raise
    progress(component, f"{describe} in {time.monotonic() - t0:.1f}s")
    return proc


class Server:
    """The frame of a server module's class (docs/development.md, Conventions): its files under
    run_dir/<component>, `detach` and `pid_dir` for ManagedProcess, the `host` it listens on
    (127.0.0.1, or a real node's bridge address for servers that Pods use), and stop()."""

    component = ""
    grace = 10.0

    def __init__(
        self, run_dir: Path, *, detach: bool = False, pid_dir: Path | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.run_dir = Path(run_dir) / self.component
        self.host = host
        self.detach = detach
        self.pid_dir = pid_dir
        self.port: int | None = None
        self.proc: ManagedProcess | None = None

    def _start(self, name: str, argv: Sequence[Any], *, log: str, **kw: Any) -> None:
        """start_ready with this server's settings; the log goes to run_dir/<log>."""
        self.proc = start_ready(
            name,
            argv,
            log_path=self.run_dir / log,
            component=self.component,
            detach=self.detach,
            pid_dir=self.pid_dir,
            grace=self.grace,
            **kw,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(self.grace)
            self.proc = None


def kill_group(pid: int, grace: float = 10.0, popen: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group, then SIGKILL it after `grace` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                break
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if popen is not None:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def stop_pid_dir(pid_dir: Path, grace: float = 10.0) -> list[str]:
    """Stop every process recorded in pid_dir (used by `beam-dev down`), newest first.

    Reverse start order matters: kube-apiserver stops in a second while etcd is up, but
    hangs until SIGKILL once etcd is gone.
    """
    files = sorted(Path(pid_dir).glob("*.pid"), key=lambda f: f.stat().st_mtime, reverse=True)
    stopped = []
    for f in files:
        try:
            pid = int(f.read_text().strip())
        except ValueError:
            f.unlink(missing_ok=True)
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _exists(pid):
            time.sleep(0.05)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        f.unlink(missing_ok=True)
        stopped.append(f.stem)
    return stopped


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A detached child of ours that exited stays a zombie until reaped; it is gone for us.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@atexit.register
def _stop_all() -> None:
    for p in list(_live):
        p.stop(grace=5)


def _on_signal(signum, frame):  # pragma: no cover - exercised by interrupting a run
    _stop_all()
    raise SystemExit(128 + signum)


if threading.current_thread() is threading.main_thread():
    # SIGTERM from CI or a parent shell: stop servers before exiting. SIGINT stays
    # KeyboardInterrupt so pytest can report, and atexit still runs after it.
    signal.signal(signal.SIGTERM, _on_signal)


def apt_install(package: str, component: str) -> None:
    """A Debian package, for a tool the stack needs and the machine lacks. Waits for dpkg's lock
    rather than failing (other setup steps may be installing too), and reads the package lists
    first on a fresh machine that has none."""
    progress(component, f"apt-get install -y {package}")
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", package]
    if subprocess.run(install, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(install, check=True)


def debian_tool(binary: str, package: str, component: str) -> str:
    """The path of `binary`, installing its Debian `package` first when it is missing."""
    found = shutil.which(binary)
    if found is None:
        apt_install(package, component)
        found = shutil.which(binary)
        assert found is not None, f"{package} installed, but no {binary} on PATH"
    return found


def wait_for(fn: Callable[[], Any], timeout: float = 60.0, what: str = "condition", interval: float = 0.2) -> Any:
    """Poll `fn` until it returns something truthy, and return that; AssertionError with the last
    value after `timeout` seconds. What tests wait on instead of sleeping."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
