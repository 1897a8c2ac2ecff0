"""beam_operator.quantity: the operator's own parser of Kubernetes quantities gives what the
kubernetes client's did, so that reconcile() needs no Kubernetes client."""

from __future__ import annotations

from decimal import Decimal

import pytest
from kubernetes.utils.quantity import parse_quantity as client_parse

from beam_operator.quantity import parse_quantity

SAMPLES = [
    "0", "1", "2", "1.5", ".5", "500m", "250m", "100n", "5u", "128k", "1K", "4M", "4G", "2T", "1P", "2E",
    "512Mi", "1Gi", "0.5Gi", "1Ki", "3Ti", "1Pi", "1Ei", "1e3", "2E2", "1.5e-3", "+1", "-1",
]  # fmt: skip


@pytest.mark.parametrize("quantity", SAMPLES)
def test_the_same_values_as_the_kubernetes_client(quantity):
    assert parse_quantity(quantity) == client_parse(quantity)


def test_numbers_and_comparisons():
    assert parse_quantity(2) == Decimal(2)
    assert parse_quantity("1536Mi") > parse_quantity("1.5G")
    assert parse_quantity("2") > parse_quantity("1999m")


@pytest.mark.parametrize("bad", ["", "m", "1x", "1 Gi", "1ki", "Gi1", "1.2.3", "1Gb"])
def test_what_is_not_a_quantity_raises(bad):
    with pytest.raises(ValueError):
        parse_quantity(bad)
