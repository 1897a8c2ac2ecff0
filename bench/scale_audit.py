"""Counting the operator's API requests from kube-apiserver's audit log.

The apiserver sees every request whatever client library made it (kopf's aiohttp watches and
patches, the kubernetes client's creates), so it is the one place where reads, writes and
watches of the operator can be counted alike. The policy logs only the operator's
ServiceAccounts at level Metadata (no bodies) and skips the RequestReceived stage, so the log
costs little; each request is one auditID.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import orjson

OPERATOR_GROUP = "system:serviceaccounts:beam-system"

POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["{OPERATOR_GROUP}"]
  - level: None
"""

READS = {"get", "list"}
WATCHES = {"watch"}
WRITES = {"create", "update", "patch", "delete", "deletecollection"}


def _ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


@dataclass
class Requests:
    by_verb: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)  # "verb resource[/subresource] code"
    status_patches: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    times: list[tuple[float, str, str, int]] = field(default_factory=list)  # (t, verb, resource, code)

    def total(self, verbs: set[str]) -> int:
        return sum(n for v, n in self.by_verb.items() if v in verbs)


def read_audit(path: Path, since: float = 0.0) -> Requests:
    events: dict[str, dict] = {}
    with open(path, "rb") as f:
        for line in f:
            try:
                ev = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line cut by an apiserver stop
            # ResponseComplete replaces a long-running request's ResponseStarted.
            events[ev["auditID"]] = ev
    out = Requests()
    for ev in events.values():
        t = _ts(ev["requestReceivedTimestamp"])
        if t < since:
            continue
        verb = ev.get("verb", "")
        ref = ev.get("objectRef") or {}
        res = ref.get("resource", ev.get("requestURI", "?"))
        if ref.get("subresource"):
            res += "/" + ref["subresource"]
        code = (ev.get("responseStatus") or {}).get("code", 0)
        out.by_verb[verb] += 1
        out.by_kind[f"{verb} {res} {code}"] += 1
        out.times.append((t, verb, res, code))
        if verb == "patch" and res == "beambackfills/status" and code < 400:
            out.status_patches[(ref.get("namespace", ""), ref.get("name", ""))].append(t)
    out.times.sort()
    return out


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most timestamps found in any interval of `window` seconds."""
    times = sorted(times)
    best = lo = 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
