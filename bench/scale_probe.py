"""Looks inside the running operator from outside (gdb), for bench/scale.py --expire: what glibc
gives back when asked (malloc_trim), and which Python objects of deleted backfills are still
referenced. Nothing in the operator's code takes part; gdb attaches, runs, and detaches.

Needs ptrace rights over the operator (root here); gdb comes from Debian's packages.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from beam_devstack.substrate.proc import debian_tool

# Run inside the operator: every object the collector tracks, and among them the Kubernetes
# bodies (dicts with metadata.uid) and the controller's per-Job records, by namespace/name.
_CENSUS = """
import collections as _c, gc as _gc, json as _j
_gc.collect()
_objs = _gc.get_objects()
_types = _c.Counter(type(o).__name__ for o in _objs)
_bodies = _c.Counter()
for _o in _objs:
    if type(_o) is dict:
        _m = _o.get("metadata")
        if type(_m) is dict and "uid" in _m:
            _bodies[(_o.get("kind") or "?") + " " + str(_m.get("namespace")) + "/" + str(_m.get("name"))] += 1
with open(OUT, "w") as _f:
    _j.dump({"objects": len(_objs), "types": _types.most_common(25), "bodies": len(_bodies),
             "bodies_sample": sorted(_bodies)[:20], "JobObs": _types.get("JobObs", 0)}, _f)
del _objs, _o, _types, _bodies
"""


def gdb() -> str:
    return debian_tool("gdb", "gdb", "probe")


def malloc_trim(pid: int) -> int:
    """glibc's malloc_trim(0) in the process: free pages it kept go back to the system."""
    done = subprocess.run(
        [gdb(), "-p", str(pid), "-batch", "-ex", "call (int) malloc_trim(0)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode


def census(pid: int) -> dict | None:
    """The operator's Python objects (after a collection), and the Kubernetes bodies among them."""
    with tempfile.TemporaryDirectory(prefix="beam-probe-") as tmp:
        out = Path(tmp) / "census.json"
        script = Path(tmp) / "census.py"
        script.write_text(f"OUT = {str(out)!r}\n" + _CENSUS)
        code = f"exec(open({str(script)!r}).read(), {{}})"
        subprocess.run(
            [
                gdb(),
                "-p",
                str(pid),
                "-batch",
                "-ex",
                "call (int) PyGILState_Ensure()",
                "-ex",
                f"call (int) PyRun_SimpleString({json.dumps(code)})",
                "-ex",
                "call (void) PyGILState_Release($1)",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        try:
            return json.loads(out.read_text())
        except (OSError, ValueError):
            return None
