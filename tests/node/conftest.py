"""The real node's fixtures are the plugin's (beam_devstack.pytest_plugin: node_cluster,
node_servers, node_operator), shared with tests/e2e: one node per machine, one operator."""

from __future__ import annotations

import pytest

from beam_devstack.pytest_plugin import provision_organization
from beam_devstack.substrate.k8s import unique_name


@pytest.fixture
def org(node_operator, node_servers):
    ns = provision_organization(node_operator, node_servers["snowflake"], unique_name("org"))
    yield ns
    node_operator.delete_namespace(ns)
