"""`beam-operator`: run the operator for all namespaces (each one an organization), or the watched ones."""

from __future__ import annotations

import os


def limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core), and
    freed memory stays in them: with 16 API threads that measured +30 MB of RSS at 300
    backfills. The API calls no longer use threads, but kopf's executor, the Prometheus server
    and the staged files' deletion still do. An explicit MALLOC_ARENA_MAX in the environment wins."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc


def main() -> None:
    limit_malloc_arenas()  # before any other thread exists
    import kopf

    from beam_contract import logs

    from . import handlers  # registers the handlers, and reads the settings

    config = handlers.CONFIG
    logs.configure(config.log_level)  # JSON in a Pod, text in a terminal (BEAM_LOG_FORMAT)
    liveness = config.liveness_endpoint or None
    lease = None
    if config.leader_election_lease:
        from .leader import Lease

        namespace = config.leader_election_namespace or os.environ.get("POD_NAMESPACE") or "default"
        lease = Lease(namespace, config.leader_election_lease)
        lease.acquire(liveness)  # standing by until then
        lease.keep()
    # standalone: no kopf peering objects; one active replica is the Lease's business.
    try:
        if config.watch_namespaces:
            kopf.run(namespaces=config.watch_namespaces, standalone=True, liveness_endpoint=liveness)
        else:
            kopf.run(clusterwide=True, standalone=True, liveness_endpoint=liveness)
    finally:
        if lease is not None:
            lease.release()


if __name__ == "__main__":
    main()
