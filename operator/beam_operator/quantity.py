"""Kubernetes resource quantities (500m, 2, 1.5, 512Mi, 4G, 1e3) as exact numbers, to compare them.

A small pure parser, so that reconcile() and the Job manifests need no Kubernetes client for
the few comparisons they make (a spec's resources against the operator's bounds, a request
against its limit). It reads what kubernetes.utils.quantity.parse_quantity reads, and gives the
same values (tests/unit/test_quantity.py compares the two).
"""

from __future__ import annotations

import re
from decimal import Decimal

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
# "K" is not Kubernetes' own, but the client's parser took it as "k", and so does this one.
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "K": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_QUANTITY = re.compile(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([eE][+-]?[0-9]+|[KMGTPE]i|[numkKMGTPE]?)")


def parse_quantity(quantity: str | int | float | Decimal) -> Decimal:
    """The number a quantity stands for; ValueError if it is not one."""
    if isinstance(quantity, int | float | Decimal):
        return Decimal(quantity)
    found = _QUANTITY.fullmatch(str(quantity))
    if found is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity")
    number, suffix = Decimal(found[1]), found[2]
    if suffix in _BINARY:
        return number * 1024 ** _BINARY[suffix]
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        return number.scaleb(int(suffix[1:]))
    return number.scaleb(_DECIMAL[suffix])
