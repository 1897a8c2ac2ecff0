"""Benchmark: the JavaScript engines spec.transforms could run on (docs/transforms.md, "The engine").

  .venv/bin/python bench/js_engines.py [--rows 50000] [--json out.json] [--no-write]

Compares, in one run and on the same rows, the engines that install from PyPI as wheels and
download nothing at run time: V8 through mini-racer (the one shipped), QuickJS-NG through
`quickjs-ng` (the maintained QuickJS binding; a dev dependency for this comparison), and the
original QuickJS through `quickjs` when it is installed instead (it has the same module name,
`quickjs`, as quickjs-ng: run this script with it in a separate environment). For each:
  - start-up: import, context, compiling the sandbox's prelude and a transform (a fresh process);
  - rows/s of the identity transform and of a typical one (one computed field, half of the rows
    dropped by a condition), batches of 4,096 rows of the ERC20 table as docs/message-format.md
    delivers them, handed over as one JSON array per batch, in the engine's own process (the
    driver is the sandbox's prelude, beam_jobrunner.js_sandbox.PRELUDE, for every engine);
    and for V8 as shipped too: in its sandbox processes, through beam_jobrunner.transform;
  - limits, each in a process of its own (does the process survive?): a 2 GB allocation
    (new Array(2**28).fill(0)), a heap that grows without end, typed arrays outside the heap,
    an infinite loop, unbounded recursion, under a 256 MiB memory limit and a 5 s time limit;
  - what the global scope offers: require, import(), fetch, process, timers, fs, and the like;
  - error reporting: line and column of an error thrown in a transform and of a syntax error.
Writes its table into docs/benchmarks.md, section "JavaScript engines for transforms" (the prose
around it is kept by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from run_context import machine  # bench/ is the script's own directory: first on sys.path
from transport import IDENTITY, TYPICAL  # the transforms transport's benchmark measures

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("v8", "quickjs-ng", "quickjs")
MEMORY_MIB, TIMEOUT_S = 256, 5.0
HOSTILE = {
    "alloc_2gb": "function transform(row) { const a = new Array(2 ** 28).fill(0); return row; }",
    "heap_grows": "function transform(row) { const a = []; for (;;) a.push({n: a.length, s: 'x'.repeat(1024) + a.length}); }",
    "typed_arrays": "function transform(row) { const a = []; for (;;) a.push(new Uint8Array(100 * 2 ** 20).fill(1)); }",
    "infinite_loop": "function transform(row) { for (;;) {} }",
    "recursion": "function f(n) { return f(n + 1) + 1; }\nfunction transform(row) { return f(0); }",
}
GLOBALS = (
    "require",
    "process",
    "fetch",
    "setTimeout",
    "setInterval",
    "queueMicrotask",
    "XMLHttpRequest",
    "WebSocket",
    "Deno",
    "Bun",
    "os",
    "std",
    "fs",
    "print",
    "console",
    "WebAssembly",
    "Atomics",
    "SharedArrayBuffer",
)
THROWS = "function transform(row) {\n  if (row.transaction_index === 3) {\n    throw new Error('bad row');\n  }\n  return row;\n}"
SYNTAX = "function transform(row) {\n  row.x = ;\n  return row;\n}"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} bench] {msg}", file=sys.stderr, flush=True)


def installed(engine: str) -> str | None:
    """The version of the package behind `engine` as this interpreter imports it, or None."""
    if engine == "v8":
        try:
            return metadata.version("mini-racer")
        except metadata.PackageNotFoundError:
            return None
    # quickjs and quickjs-ng both install the module `quickjs`: which one is imported?
    import importlib.util

    spec = importlib.util.find_spec("quickjs")
    if spec is None or spec.origin is None:
        return None
    where = Path(spec.origin).resolve().parent.parent
    for dist in metadata.distributions():
        if dist.metadata["Name"].lower() == engine and any(
            str(f).replace("\\", "/") == "quickjs/__init__.py" for f in dist.files or ()
        ):
            if Path(dist.locate_file("quickjs/__init__.py")).resolve().parent.parent == where:
                return dist.version
    return None


# --- one engine in this process ---------------------------------------------------------------


class Engine:
    """The sandbox's prelude and transforms in one engine, called as the worker calls it."""

    def __init__(self, engine: str, memory_mib: int = MEMORY_MIB, timeout_s: float = TIMEOUT_S) -> None:
        from beam_jobrunner.js_sandbox import PRELUDE

        self.engine = engine
        if engine == "v8":
            from py_mini_racer import MiniRacer

            self.mr = MiniRacer()
            self.mr.set_hard_memory_limit(memory_mib * 2**20)
            self.timeout = timeout_s
            self.add, self.run, _ = self.mr.eval(PRELUDE)
        else:
            import quickjs

            self.ctx = quickjs.Context()
            self.ctx.set_memory_limit(memory_mib * 2**20)
            self.ctx.set_time_limit(timeout_s)
            self.ctx.set_max_stack_size(1024 * 1024)
            self.ctx.eval("var __beam = " + PRELUDE)
            self.run = self.ctx.eval("__beam[1]")

    def add_script(self, n: int, script: str) -> None:
        from beam_jobrunner.js_sandbox import PREFIX, SUFFIX

        code = PREFIX + script + SUFFIX.replace("{n}", str(n))
        if self.engine == "v8":
            self.add(self.mr.eval(code, timeout_sec=self.timeout))
        else:
            self.ctx.eval("__beam[0](" + code + "\n)")

    def call(self, text: str, chunk: int = 0, first: int = 0) -> str:
        if self.engine == "v8":
            return self.run(text, chunk, first, timeout_sec=self.timeout)
        return self.run(text, chunk, first)

    def eval(self, code: str):
        return self.mr.eval(code) if self.engine == "v8" else self.ctx.eval(code)


def batches(rows: int, batch: int) -> list[tuple[str, int]]:
    """The benchmark's rows as delivered (serialize.py), as JSON arrays of `batch` rows."""
    sys.path.insert(0, str(ROOT / "bench"))
    from transport import synthetic

    from beam_jobrunner import serialize

    values, _ = serialize.encode(synthetic(rows))
    return [("[" + ",".join(values[i : i + batch]) + "]", len(values[i : i + batch])) for i in range(0, rows, batch)]


def throughput(engine: str, arrays: list[tuple[str, int]], rounds: int) -> dict:
    """rows/s (input rows) of the identity and the typical transform: best of `rounds` passes."""
    out = {}
    total = sum(n for _, n in arrays)
    for name, script in (("identity", IDENTITY), ("typical", TYPICAL)):
        e = Engine(engine, timeout_s=60)
        e.add_script(1, script)
        first = 0
        assert e.call(arrays[0][0])[:1] == "K"
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            first = 0
            for text, n in arrays:
                r = e.call(text, 0, first)
                first += n
            best = min(best, time.perf_counter() - t0)
            assert r[:1] == "K", r[:300]
        out[name] = total / best
        del e
    return out


def shipped_throughput(arrays: list[tuple[str, int]], rounds: int) -> dict:
    """The same through beam_jobrunner.transform as transport runs it: V8 in its sandbox
    processes (two by default), batches handed to them in turn (Transformer.stream)."""
    from beam_jobrunner.transform import Limits, Transformer

    out = {}
    total = sum(n for _, n in arrays)
    encoded = [(text.encode(), [None] * n) for text, n in arrays]
    for name, script in (("identity", IDENTITY), ("typical", TYPICAL)):
        t = Transformer([script], Limits(timeout_s=60)).start()
        try:
            t.apply(*encoded[0], chunk=0, first_row=0, as_bytes=True)
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _batch in t.stream(iter(encoded), chunk=0, as_bytes=True):
                    pass
                best = min(best, time.perf_counter() - t0)
            out[name] = total / best
            out["sandboxes"] = t.limits.sandboxes
        finally:
            t.close()
    return out


# --- in a process of its own: start-up, limits, globals, errors ------------------------------------


def child(engine: str, case: str) -> dict:
    """One measurement in this (fresh) process; printed as JSON on stdout if the process lives."""
    rows = '[{"unique_id":"u0","transaction_index":3,"usd_amount":1.5},{"unique_id":"u1","transaction_index":4,"usd_amount":2.5}]'
    if case == "startup":
        t0 = time.perf_counter()
        if engine == "v8":
            import py_mini_racer  # noqa: F401
        else:
            import quickjs  # noqa: F401
        t1 = time.perf_counter()
        e = Engine(engine)
        t2 = time.perf_counter()
        e.add_script(1, TYPICAL)
        e.call(rows)
        t3 = time.perf_counter()
        return {"import_s": t1 - t0, "context_s": t2 - t1, "compile_and_first_call_s": t3 - t2}
    if case == "globals":
        probe = "[" + ",".join(f"typeof {g}" for g in GLOBALS) + "].join()"
        if engine == "v8":  # the bare engine, as mini-racer makes it
            from py_mini_racer import MiniRacer

            bare = MiniRacer().eval(probe).split(",")
        else:
            import quickjs

            bare = quickjs.Context().eval(probe).split(",")
        e = Engine(engine)
        after = e.eval(probe).split(",")
        e.add_script(
            1,
            "function transform(row) { try { row.i = typeof import('fs'); } catch (e) { row.i = 'syntax error'; } return row; }",
        )
        return {
            "present": [g for g, t in zip(GLOBALS, bare, strict=True) if t != "undefined"],
            "after_prelude": [g for g, t in zip(GLOBALS, after, strict=True) if t != "undefined"],
            "import()": json.loads(e.call(rows).split("\n")[1])["i"],
        }
    if case == "errors":
        e = Engine(engine)
        e.add_script(1, THROWS)
        answer = e.call(rows)
        thrown = json.loads(answer[1:]) if answer[:1] == "E" else {}
        raw = ""
        try:
            Engine(engine).add_script(1, SYNTAX)
        except Exception as x:  # noqa: BLE001
            raw = str(x)
        return {"thrown": thrown, "syntax_error": raw}
    if case == "raw_throw":  # the engine's own stack for an error, whatever the prelude parses
        e = Engine(engine)
        e.eval("function transform(row) {\n  if (row) {\n    throw new Error('bad row');\n  }\n}")
        try:
            e.eval("transform(1)")
        except Exception as x:  # noqa: BLE001
            return {"stack": str(x)}
        return {"stack": ""}
    # a hostile transform
    e = Engine(engine)
    e.add_script(1, HOSTILE[case])
    t0 = time.perf_counter()
    try:
        r = e.call(rows)
        outcome = r[:300]
    except Exception as x:  # noqa: BLE001
        outcome = f"{type(x).__name__}: {str(x)[:200]}"
    return {"outcome": " ".join(outcome.split()), "seconds": time.perf_counter() - t0}


def in_fresh_process(engine: str, case: str, timeout: float = 120) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, __file__, "--child", engine, case],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    peak = 0
    while p.poll() is None and time.perf_counter() - t0 < timeout:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                peak = max(peak, int(f.read().split("VmRSS:")[1].split()[0]) // 1024)
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.02)
    if p.poll() is None:
        p.kill()
    out, err = p.communicate()
    result = {
        "survived": p.returncode == 0,
        "returncode": p.returncode,
        "peak_rss_mib": peak,
        "wall_s": time.perf_counter() - t0,
    }
    if p.returncode == 0 and out.strip():
        result.update(json.loads(out.strip().splitlines()[-1]))
    else:
        last = [line for line in err.splitlines() if line.strip() and not line.startswith("    /")]
        result["outcome"] = " ".join(" | ".join(last[-3:]).split())[:300]
    return result


def shipped_hostile(case: str) -> dict:
    """A hostile transform through beam_jobrunner.transform: does this (the worker's) process go on?"""
    from beam_jobrunner.transform import Limits, Transformer, TransformError

    t0 = time.perf_counter()
    t = Transformer([HOSTILE[case]], Limits(memory_mib=MEMORY_MIB, timeout_s=TIMEOUT_S))
    try:
        t.start()
        t.apply(b'[{"unique_id":"u0"}]', ["u0"], chunk=0, first_row=0, as_bytes=False)
        outcome = "no error"
    except TransformError as e:
        outcome = str(e)
    finally:
        t.close()
    return {"survived": True, "outcome": outcome, "wall_s": time.perf_counter() - t0}


def position(text: str) -> str:
    """'line:column', 'line' or '-' found in an engine's error text."""
    m = re.search(r":(\d+):(\d+)", text) or re.search(r"<input>:(\d+)\)?", text)
    if m and len(m.groups()) == 2:
        return f"{m[1]}:{m[2]}"
    caret = re.search(r"^(?:.*?):(\d+): .*\n.*\n( *)\^", text, flags=re.M)
    if caret:
        from beam_jobrunner.js_sandbox import PREFIX

        col = len(caret[2]) + 1 - (len(PREFIX) if caret[1] == "1" else 0)
        return f"{caret[1]}:{col}"
    return m[1] if m else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the rows; the best counts")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--no-hostile", action="store_true", help="skip the limits (the slowest part)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)), flush=True)
        os._exit(0)  # no engine teardown: a process that got here lived through the measurement

    engines = [e for e in args.engines.split(",") if installed(e)]
    say(f"engines installed: {', '.join(f'{e} {installed(e)}' for e in engines)}")
    arrays = batches(args.rows, args.batch)
    say(
        f"{args.rows:,} rows in batches of {args.batch}, average {sum(len(t) for t, _ in arrays) / args.rows:.0f} bytes of JSON per row"
    )
    results: dict = {"rows": args.rows, "batch": args.batch, "engines": {}}
    for engine in engines:
        r: dict = {"version": installed(engine)}
        r["startup"] = in_fresh_process(engine, "startup")
        r["rows_per_s"] = throughput(engine, arrays, args.rounds)
        say(f"{engine}: {r['rows_per_s']['identity']:,.0f} rows/s identity, {r['rows_per_s']['typical']:,.0f} typical")
        r["globals"] = in_fresh_process(engine, "globals")
        errors = in_fresh_process(engine, "errors")
        raw = in_fresh_process(engine, "raw_throw")
        r["errors"] = {
            "thrown": position(raw.get("stack", "")),
            "syntax": position(errors.get("syntax_error", "")),
            "raw_thrown": raw.get("stack", "")[:200],
            "raw_syntax": errors.get("syntax_error", "")[:200],
        }
        if not args.no_hostile:
            r["hostile"] = {case: in_fresh_process(engine, case) for case in HOSTILE}
            for case, h in r["hostile"].items():
                say(
                    f"{engine} {case}: survived {h['survived']} ({h.get('outcome', '')[:120]}), {h['wall_s']:.1f}s, peak {h['peak_rss_mib']} MiB"
                )
        results["engines"][engine] = r
    if "v8" in engines:
        shipped: dict = {"rows_per_s": shipped_throughput(arrays, args.rounds)}
        say(
            f"v8 in its sandbox process (as shipped): {shipped['rows_per_s']['identity']:,.0f} rows/s identity, {shipped['rows_per_s']['typical']:,.0f} typical"
        )
        if not args.no_hostile:
            shipped["hostile"] = {case: shipped_hostile(case) for case in HOSTILE}
        results["shipped"] = shipped
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    table = figures_table(results)
    print(table)
    if not args.no_write:
        write_doc(args, table)


def figures_table(r: dict) -> str:
    engines = r["engines"]

    def cell(engine: str, f) -> str:
        try:
            return f(engines[engine])
        except (KeyError, TypeError, IndexError):
            return "-"

    def hostile(case: str):
        def f(e):
            h = e["hostile"][case]
            if not h["survived"]:
                return f"**process died** ({h['returncode']}) after {h['wall_s']:.1f} s, {h['peak_rss_mib']} MiB"
            out = h.get("outcome", "")
            stopped = "stopped" if out[:1] == "E" or "Exception" in out or "Error" in out else "not stopped"
            return f"{stopped} in {h.get('seconds', h['wall_s']):.1f} s, {h['peak_rss_mib']} MiB"

        return f

    names = list(engines)
    head = "| | " + " | ".join(f"{n} {engines[n]['version']}" for n in names) + " |\n|---|" + "---|" * len(names) + "\n"
    rows = [
        (
            "start-up: import / context + prelude / compile + first call (s)",
            lambda e: (
                f"{e['startup']['import_s']:.2f} / {e['startup']['context_s']:.3f} / {e['startup']['compile_and_first_call_s']:.3f}"
            ),
        ),
        ("identity transform, rows/s (in the engine's process)", lambda e: f"{e['rows_per_s']['identity']:,.0f}"),
        ("typical transform, rows/s (in the engine's process)", lambda e: f"{e['rows_per_s']['typical']:,.0f}"),
        *[(f"{case.replace('_', ' ')} ({MEMORY_MIB} MiB, {TIMEOUT_S:g} s limits)", hostile(case)) for case in HOSTILE],
        (
            "globals beyond ECMAScript, of those probed: bare engine",
            lambda e: ", ".join(e["globals"]["present"]) or "none",
        ),
        ("... and after the sandbox's prelude", lambda e: ", ".join(e["globals"]["after_prelude"]) or "none"),
        ("import('fs')", lambda e: e["globals"]["import()"]),
        (
            "position of a thrown error / of a syntax error",
            lambda e: f"{e['errors']['thrown']} / {e['errors']['syntax']}",
        ),
    ]
    body = "".join(f"| {label} | " + " | ".join(cell(n, f) for n in names) + " |\n" for label, f in rows)
    shipped = r.get("shipped")
    if shipped:
        pad = " |" * (len(names) - 1) + "\n"
        body += (
            f"| V8 as shipped ({shipped['rows_per_s']['sandboxes']} sandbox processes, beam_jobrunner.transform): identity / typical rows/s | "
            f"{shipped['rows_per_s']['identity']:,.0f} / {shipped['rows_per_s']['typical']:,.0f} |" + pad
        )
        for case, h in shipped.get("hostile", {}).items():
            said = h["outcome"].removeprefix("transforms: ")
            said = re.sub(r" on chunk 0, (at |in )?(the batch of \d+ rows from )?row with unique_id u0", "", said)
            body += (
                f"| V8 as shipped, {case.replace('_', ' ')}: the worker goes on; its error | {said} ({h['wall_s']:.1f} s) |"
                + pad
            )
    return head + body


def write_doc(args, table: str) -> None:
    say(f"run context: `.venv/bin/python bench/js_engines.py --rows {args.rows} --rounds {args.rounds}`; {machine()}")
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    section = re.search(r"^## JavaScript engines for transforms\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    old = section and re.search(r"^\| \| v8 .*?\n(?!\|)", section.group(0), flags=re.S | re.M)
    if old:
        start = section.start() + old.start()
        text = text[:start] + table + text[section.start() + old.end() :]
    else:
        text = text.rstrip("\n") + "\n\n## JavaScript engines for transforms\n\n" + table
    doc.write_text(text)
    say(f"wrote the table into {doc}")


if __name__ == "__main__":
    main()
