"""Fixtures for the REST API on the local control plane: the CRD, the chart's API identity, a
running `beam-api`, and organizations with keys."""

from __future__ import annotations

import pytest
from apiproc import KEYS_NS, ApiProcess, install_chart_identities
from kubernetes.client import CoreV1Api

from beam_operator.api import keys as keymod
from beam_operator.api.kube import api_client


@pytest.fixture(scope="session")
def crd(k8s):
    from beam_devstack.operator_proc import install_crd

    install_crd(k8s)


@pytest.fixture(scope="session")
def helm():
    from beam_devstack.operator_proc import helm_binary

    return helm_binary()


@pytest.fixture(scope="session")
def chart_identities(k8s, crd, helm):
    """{"api": kubeconfig, "operator": kubeconfig} of the chart's ServiceAccounts."""
    return install_chart_identities(k8s, helm)


@pytest.fixture(scope="session")
def api_kubeconfig(chart_identities):
    return chart_identities["api"]


@pytest.fixture(scope="session")
def api(api_kubeconfig, tmp_path_factory):
    """The API under the chart's ServiceAccount, with limits high enough for fuzzing."""
    proc = ApiProcess(tmp_path_factory.mktemp("api"), kubeconfig=api_kubeconfig).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def admin_core(k8s):
    """CoreV1Api as the cluster admin: what an administrator running `beam-api keys` has."""
    return CoreV1Api(api_client(str(k8s.kubeconfig)))


@pytest.fixture
def org(namespace, admin_core):
    """An organization (a fresh namespace) and a key for it: (organization_id, key)."""
    _, key = keymod.create_key(admin_core, KEYS_NS, namespace, "test")
    return namespace, key


@pytest.fixture
def other_org(k8s, admin_core, request):
    from beam_devstack.substrate.k8s import unique_name

    name = k8s.create_namespace(unique_name("other"), wait_service_account=False)
    _, key = keymod.create_key(admin_core, KEYS_NS, name, "test")
    yield name, key
    k8s.delete_namespace(name)
