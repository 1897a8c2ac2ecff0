"""Counting the operator's API requests from kube-apiserver's audit log.

The apiserver sees every request whatever client library made it (kopf's aiohttp watches and
patches, the kubernetes client's creates), so it is the one place where reads, writes and
watches of the operator can be counted alike. The policy logs the operator's ServiceAccounts
and, from anyone, the creates of BeamBackfills, at level Metadata (no bodies), and skips the
RequestReceived stage, so the log costs little; each request is one auditID.

The creates also give the apiserver's own view of apply -> staging Job created: both ends are
stamped by the same kube-apiserver clock to the microsecond, with no watch stream in between.
A client's watch can lag seconds behind on a saturated machine (the benchmark's own does), and
metadata.creationTimestamp has whole seconds only.
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
  - level: Metadata
    verbs: ["create"]
    resources: [{{group: "beam-backfill.dev", resources: ["beambackfills"]}}]
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
    # The apiserver's clock: BeamBackfill create received, and each staging Job create answered 201.
    backfill_created: dict[tuple[str, str], float] = field(default_factory=dict)
    staging_job_created: dict[tuple[str, str], float] = field(default_factory=dict)  # by (namespace, backfill)
    # The operator's first request about a new backfill (its finalizer patch): received and
    # answered; and its staging Job create received. Where apply -> staging Job goes.
    finalizer_patch: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    staging_job_sent: dict[tuple[str, str], float] = field(default_factory=dict)

    def apply_to_staging_job(self) -> list[float]:
        return [
            self.staging_job_created[k] - t for k, t in self.backfill_created.items() if k in self.staging_job_created
        ]

    def apply_to_staging_job_parts(self) -> dict[str, list[float]]:
        """apply -> staging Job in three parts, each on the apiserver's clock: until the
        operator's finalizer patch arrives (its watch, its queue), the patch itself, from its
        answer until the Job create arrives (the operator), and the Job create itself."""
        parts: dict[str, list[float]] = {"until_finalizer": [], "finalizer": [], "until_job": [], "job": []}
        for k, t in self.backfill_created.items():
            if k not in self.finalizer_patch or k not in self.staging_job_sent or k not in self.staging_job_created:
                continue
            f_in, f_out = self.finalizer_patch[k]
            parts["until_finalizer"].append(f_in - t)
            parts["finalizer"].append(f_out - f_in)
            parts["until_job"].append(self.staging_job_sent[k] - f_out)
            parts["job"].append(self.staging_job_created[k] - self.staging_job_sent[k])
        return parts

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
        key = (ref.get("namespace", ""), ref.get("name", ""))
        if OPERATOR_GROUP not in (ev.get("user") or {}).get("groups", []):
            if verb == "create" and res == "beambackfills" and code == 201:
                out.backfill_created[key] = t
            continue  # not the operator's request: timed, not counted
        if verb == "create" and res == "jobs" and code == 201 and key[1].endswith("-staging"):
            # <backfill>-<uid8>-staging (operator/beam_operator/child_jobs.py)
            owner = (key[0], key[1].rsplit("-", 2)[0])
            out.staging_job_created[owner] = _ts(ev["stageTimestamp"])
            out.staging_job_sent[owner] = t
        if verb == "patch" and res == "beambackfills" and code < 400:
            if key not in out.finalizer_patch or t < out.finalizer_patch[key][0]:  # the first: the add
                out.finalizer_patch[key] = (t, _ts(ev["stageTimestamp"]))
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
