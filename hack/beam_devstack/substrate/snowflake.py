"""fakesnow's HTTP server (Snowflake's wire protocol over DuckDB) on 127.0.0.1.

The real snowflake-connector-python talks to it. All connections share one in-memory DuckDB
per server process (fakesnow's default in server mode), so data seeded through one connection
is visible to a worker's own connection; a restart starts empty.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from beam_devstack.substrate.proc import Server, free_port, progress

READY_TIMEOUT = 60.0
ACCOUNT, USER, PASSWORD = "fakesnow", "fake", "snow"
# fakesnow answers SQL it cannot translate with HTTP 500, which the connector retries until
# network_timeout: keep that short so an unsupported statement fails in seconds, not minutes.
NETWORK_TIMEOUT = 15


def ensure_installed() -> None:
    if importlib.util.find_spec("fakesnow") is None:
        progress("snowflake", "installing fakesnow[server] from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "fakesnow[server]~=0.12.1"], check=True)
        importlib.invalidate_caches()


def connect(endpoints: dict, database: str | None = None, schema: str | None = None, **kw):
    """A snowflake.connector connection to the fakesnow server described by `endpoints`."""
    import snowflake.connector

    params = dict(
        account=endpoints["account"],
        user=endpoints["user"],
        password=endpoints["password"],
        host=endpoints["host"],
        port=endpoints["port"],
        protocol=endpoints["protocol"],
        database=database,
        schema=schema,
        network_timeout=NETWORK_TIMEOUT,
        login_timeout=NETWORK_TIMEOUT,
        paramstyle="qmark",
    )
    params.update(kw)
    return snowflake.connector.connect(**params)


class FakeSnowflake(Server):
    component = "snowflake"

    def endpoints(self) -> dict:
        return {
            "host": self.host,
            "port": self.port,
            "account": ACCOUNT,
            "user": USER,
            "password": PASSWORD,
            "protocol": "http",
        }

    def connect(self, database: str | None = None, schema: str | None = None, **kw):
        return connect(self.endpoints(), database, schema, **kw)

    def start(self) -> FakeSnowflake:
        ensure_installed()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # fakesnow makes a stage directory in TMPDIR at import and never removes it: in our run
        # directory, it goes when the run does.
        tmp = self.run_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        self._start(
            "fakesnow",
            [sys.executable, "-m", "fakesnow", "-s", "-p", self.port, "--host", self.host],
            log="fakesnow.log",
            tcp=(self.host, self.port),
            ready="listening",
            checks=[(self._answers_sql, "answering SQL")],
            timeout=READY_TIMEOUT,
            describe=f"fakesnow ready on {self.host}:{self.port}",
            env={**os.environ, "TMPDIR": str(tmp)},
        )
        return self

    def _answers_sql(self) -> bool:
        with self.connect() as conn:
            return conn.cursor().execute("SELECT 1").fetchone() == (1,)
