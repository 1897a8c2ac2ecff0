"""The Snowflake Secret an organization's namespace holds, for the stack's fakesnow: the
project's side of the stand-in (beam_devstack.substrate.snowflake knows nothing of the operator)."""

from __future__ import annotations


def connection_secret(
    endpoints: dict, name: str = "beam-snowflake", database: str = "base", schema: str = "assets"
) -> dict:
    """The Secret an administrator creates in an organization's namespace for the fakesnow server
    whose endpoints() these are: the keys the operator maps into the staging Job
    (beam_contract.worker.SNOWFLAKE_SECRET_KEYS)."""
    import base64

    data = {
        "account": endpoints["account"],
        "user": endpoints["user"],
        "password": endpoints["password"],
        "host": endpoints["host"],
        "port": str(endpoints["port"]),
        "protocol": endpoints["protocol"],
        "database": database,
        "schema": schema,
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }
