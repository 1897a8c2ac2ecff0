"""`beam-operator`: run the operator for all namespaces (each one an organization), or the watched ones."""

from __future__ import annotations

import os

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_ARENA_MAX = -1, -8


def tune_malloc(arenas: int = 2, trim_threshold: int = 64 * 1024) -> None:
    """How glibc keeps memory that Python frees; an explicit MALLOC_ARENA_MAX or
    MALLOC_TRIM_THRESHOLD_ in the environment wins.

    Arenas: glibc gives each thread that allocates its own arena (up to 8 per core), and freed
    memory stays in them: with the API calls in threads that was tens of MB of RSS
    (docs/benchmarks.md, "Earlier figures behind the operator's settings"). The API calls no
    longer use threads, but kopf's executor, the Prometheus server and the staged files'
    deletion still do.

    Trim threshold: by default glibc raises its trim and mmap thresholds each time a large block
    is freed, so that the 256 KiB TLS buffers of pooled connections, and large API answers, end
    up inside its heap, which it then keeps: after a mass expiry, a fifth of the operator's RSS
    was such free memory. A fixed 64 KiB threshold, the value dask sets for its workers, keeps
    it from piling up (docs/benchmarks.md, "Finished backfills expiring", the table "300
    backfills × 1 chunk, operator RSS").
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not os.environ.get("MALLOC_ARENA_MAX"):
            libc.mallopt(M_ARENA_MAX, arenas)
        if not os.environ.get("MALLOC_TRIM_THRESHOLD_"):
            libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    except (OSError, AttributeError):
        pass  # not glibc


def main() -> None:
    tune_malloc()  # before any other thread exists
    import kopf

    from beam_contract import logs

    from . import handlers  # registers the handlers, and reads the settings

    config = handlers.CONFIG
    logs.configure(config.log_level)  # JSON in a Pod, text in a terminal (BEAM_LOG_FORMAT)
    liveness = config.liveness_endpoint or None
    lease = None
    if config.leader_election_lease:
        from .kubeclient import KubeApi
        from .leader import Lease

        namespace = config.leader_election_namespace or os.environ.get("POD_NAMESPACE") or "default"
        lease = Lease(namespace, config.leader_election_lease, lambda: KubeApi(config, connections=2, timeout=10))
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
