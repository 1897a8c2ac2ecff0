"""Session-scoped pytest fixtures: one real server of each kind per test session.

Each fixture starts its server on a free 127.0.0.1 port under the session's tmp dir and stops
it at the end of the session (and, through proc.ManagedProcess, on any exit of pytest).
"""

from __future__ import annotations

import pytest

# --- Kubernetes control plane (beam_devstack.k8s) ------------------------------------------

# --- node agent (beam_devstack.nodeagent) ---------------------------------------------------

# --- brokers: Kafka, fake-gcs-server, fakesnow, NATS, SNS ------------------------------------
