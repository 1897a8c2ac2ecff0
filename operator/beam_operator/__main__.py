"""`beam-operator`: run the operator for all namespaces (each namespace is an organization)."""

from __future__ import annotations

import logging
import os


def main() -> None:
    import kopf

    from . import handlers  # noqa: F401  registers the handlers

    logging.basicConfig(level=os.environ.get("BEAM_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    liveness = os.environ.get("BEAM_LIVENESS_ENDPOINT", "http://0.0.0.0:8081/healthz") or None
    # standalone: one replica (Deployment strategy Recreate) and no peering objects to manage.
    kopf.run(clusterwide=True, standalone=True, liveness_endpoint=liveness)


if __name__ == "__main__":
    main()
