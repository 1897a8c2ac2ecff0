"""The JavaScript sandbox: a child process of a worker that runs spec.transforms in V8.

beam_jobrunner.transform starts it as `python -I -B -m beam_jobrunner.js_sandbox MEMORY_MIB TIMEOUT_S PPID`
with an empty environment, and talks to it over its stdin and stdout. Why a process of its own
(docs/transforms.md, "The sandbox"): V8 ends the process it runs in when a script outgrows the
heap inside one builtin (`new Array(2**27).fill(0)` does, whatever limit mini-racer sets), and a
worker must survive any script to report it. Here such a script ends this process only; the
worker kills it as well past the time limit, if V8 could not stop the script itself.

What a script has: ECMAScript and nothing else. V8 brings no require, import, fetch, process,
file system or network; this module removes what mini-racer and V8 add (setTimeout and
clearTimeout, WebAssembly, Atomics, SharedArrayBuffer), makes console a no-op, and takes away
the clock and the randomness that would make a rerun differ (Date.now() and new Date() throw,
Temporal.Now is gone, Math.random() is reseeded for every row from its chunk and position). The
process itself has no environment (no Secret can be read), writes no files (RLIMIT_FSIZE 0) and
no core dumps, cannot gain privileges, dies with its worker (PR_SET_PDEATHSIG), and maps no more
writable memory than the heap's limit and DATA_OVERHEAD_MIB (RLIMIT_DATA).

Frames both ways: one byte (the operation), the payload's length (8 bytes, little-endian), the
payload. Requests:
  C  JSON {"scripts": [...]}: compile them in order; answers K (JSON {"v8": version}) or E.
  R  chunk and first row (8 bytes each, little-endian), then a JSON array of rows (UTF-8): apply
     the transforms to each row; answers K with `header "\\n" body`, or E.
The header says where each output row comes from: `*` when every input row gave exactly one
row, else one entry per output row, comma-separated: the input row's index in the batch, then
`#n` for the n-th element of an array a transform returned (one per transform that did). The
body is the output rows' JSON, one per line (JSON.stringify never writes a raw newline).
E is JSON {"kind", "transform", "row", "message", "line", "column", ...}: kind is compile,
load, no_transform, throw, not_a_row, not_json, timeout or memory; row and transform are indexes
(-1: unknown); line and column are the script's own (0: unknown).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys

HEADER = struct.Struct("<cQ")
RUN_HEAD = struct.Struct("<QQ")
# Each script is compiled as the body of a function, so its declarations stay its own (two
# scripts may both declare `const RATE`) and its `transform` is the one taken. The prefix shares
# the script's first line: columns there are shifted by its length.
PREFIX = "(function(){"
SUFFIX = "\n;return typeof transform === 'function' ? transform : undefined;})()\n//# sourceURL=transform-{n}.js"

# Runs first, before any script. It keeps what the worker calls in a closure no script can
# reach, and the built-ins it uses in constants no script can replace.
PRELUDE = r"""
(function () {
  "use strict";
  const G = globalThis;
  const parse = JSON.parse, stringify = JSON.stringify, isArray = Array.isArray;
  const getProto = Object.getPrototypeOf, objectProto = Object.prototype, defineProperty = Object.defineProperty;
  const construct = Reflect.construct, toStr = String, imul = Math.imul;
  const fns = [];
  // The row and the transform at work, where the sandbox reads them without calling V8 (after
  // a time or memory limit stopped the script, V8 may refuse every call).
  const pos = new Int32Array(2);
  pos[0] = -1;
  pos[1] = -1;

  // What a sandbox must not have: timers (mini-racer's), shared memory and its waits, and
  // WebAssembly (memory outside the JavaScript heap's limit). V8 itself has no I/O at all.
  // (mini-racer declares its timers with var: not deletable, but writable.)
  for (const name of ["setTimeout", "clearTimeout", "__timer_manager", "WebAssembly", "Atomics", "SharedArrayBuffer"]) {
    try { delete G[name]; } catch (e) {}
    try { if (name in G) G[name] = undefined; } catch (e) {}
  }
  const quiet = () => undefined;
  const console = {};
  for (const m of ["log", "info", "warn", "error", "debug", "trace", "dir", "table", "assert", "count", "time", "timeEnd"]) console[m] = quiet;
  defineProperty(G, "console", {value: Object.freeze(console), writable: false, configurable: false, enumerable: false});

  // The same input must give the same output on every rerun (exactly once into Kafka, stable
  // idempotency keys): no clock, and a random generator seeded by the row.
  const noClock = () => {
    throw new TypeError("the current time is not available in a transform: a rerun must give the same rows " +
      "(use the row's block_timestamp; docs/transforms.md)");
  };
  const RealDate = G.Date;
  const Date = function Date(...args) {
    if (new.target === undefined || args.length === 0) noClock();
    return construct(RealDate, args, new.target);
  };
  Date.prototype = RealDate.prototype;
  defineProperty(RealDate.prototype, "constructor", {value: Date, writable: true, configurable: true, enumerable: false});
  Date.UTC = RealDate.UTC;
  Date.parse = RealDate.parse;
  Date.now = noClock;
  defineProperty(G, "Date", {value: Date, writable: true, configurable: true, enumerable: false});
  if (typeof G.Temporal === "object" && G.Temporal !== null) {
    try { delete G.Temporal.Now; } catch (e) {}
  }
  let seed = 0;
  Math.random = function random() {  // mulberry32
    seed = (seed + 0x6D2B79F5) | 0;
    let t = seed;
    t = imul(t ^ (t >>> 15), t | 1);
    t ^= t + imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };

  function isRow(v) {
    if (typeof v !== "object" || v === null || isArray(v)) return false;
    const p = getProto(v);
    return p === objectProto || p === null;
  }
  function kindOf(v) {
    if (v === null) return "null";
    if (isArray(v)) return "array";
    if (typeof v === "object") {
      const p = getProto(v);
      const c = p && p.constructor;
      return typeof c === "function" && typeof c.name === "string" && c.name ? "object of class " + c.name : "object";
    }
    return typeof v;
  }
  class Failure {
    constructor(info) { this.info = info; }
  }
  function thrown(e, k, i) {
    const info = {kind: "throw", transform: k, row: i, message: "", line: 0, column: 0};
    try {
      if (e !== null && typeof e === "object" && typeof e.message === "string") {
        info.message = (typeof e.name === "string" && e.name ? e.name + ": " : "") + e.message;
        const stack = typeof e.stack === "string" ? e.stack : "";
        const m = /transform-(\d+)\.js:(\d+):(\d+)/.exec(stack);
        if (m) {
          info.in_transform = +m[1] - 1;
          info.line = +m[2];
          info.column = +m[3];
        }
      } else {
        info.message = "uncaught " + kindOf(e) + ": " + toStr(typeof e === "symbol" ? "symbol" : e);
      }
    } catch (x) {
      info.message = info.message || "uncaught exception";
    }
    return new Failure(info);
  }

  const out = [];
  const ids = [];
  let m = 0, one = true;
  function emit(v, k, i, suffix) {
    for (; k < fns.length; k++) {
      pos[1] = k;
      let r;
      try {
        r = fns[k](v);
      } catch (e) {
        throw thrown(e, k, i);
      }
      if (r === null || r === undefined) {
        one = false;
        return;
      }
      if (isArray(r)) {
        one = false;
        for (let j = 0; j < r.length; j++) {
          const x = r[j];
          if (x === null || x === undefined) continue;
          if (!isRow(x)) throw new Failure({kind: "not_a_row", transform: k, row: i, element: j, returned: kindOf(x)});
          emit(x, k + 1, i, suffix + "#" + j);
        }
        return;
      }
      if (!isRow(r)) throw new Failure({kind: "not_a_row", transform: k, row: i, element: -1, returned: kindOf(r)});
      v = r;
    }
    let text;
    try {
      text = stringify(v);
    } catch (e) {
      const f = thrown(e, fns.length - 1, i);
      f.info.kind = "not_json";
      throw f;
    }
    if (typeof text !== "string" || text.charCodeAt(0) !== 123) {
      throw new Failure({kind: "not_json", transform: fns.length - 1, row: i, message: "its JSON is not an object (a toJSON method?)", line: 0, column: 0});
    }
    out[m] = text;
    ids[m] = suffix === "" ? i : i + suffix;
    m++;
  }

  function run(input, chunk, first) {
    const rows = parse(input);
    input = null;
    out.length = 0;
    ids.length = 0;
    m = 0;
    one = true;
    try {
      for (let i = 0; i < rows.length; i++) {
        pos[0] = i;
        seed = imul(chunk | 0, 0x9E3779B1) ^ imul((first + i) | 0, 0x85EBCA77) ^ 0x27D4EB2F;
        const v = rows[i];
        rows[i] = undefined;
        emit(v, 0, i, "");
      }
    } catch (e) {
      // A Failure, or what escaped the transforms' own guard (a Proxy's trap, say).
      return "E" + stringify((e instanceof Failure ? e : thrown(e, pos[1], pos[0])).info);
    } finally {
      pos[0] = -1;
      pos[1] = -1;
    }
    const head = one && m === rows.length ? "*" : ids.join(",");
    const body = out.join("\n");
    out.length = 0;
    ids.length = 0;
    return ["K", head, "\n", body].join("");  // one flat string (QuickJS cannot hand a rope to Python)
  }
  function add(fn) {
    fns.push(fn);
    return fns.length;
  }
  return [add, run, pos.buffer];
})()
"""

# V8's own message of an error at compile time, as mini-racer gives it: "<file>:<line>: <text>",
# the source line, a line of carets under the place.
_FIRST = re.compile(r"^(?P<file>.*?):(?P<line>\d+): (?P<text>.*)$")


# Put before a script to parse it on its own (not as a function's body) without running any of it.
PARSE_ONLY = "throw 0;"


def position(message: str, script: str, alone=None) -> dict:
    """Line, column and text of a compile-time error in `script`, from mini-racer's message.

    An error V8 places in the wrapper's closing lines comes from a script that closes more
    blocks than it opens (its extra `}` closed the wrapper) or leaves one open: `alone(script)`,
    the message of parsing the script by itself, then places it in the script."""
    lines = message.splitlines()
    m = _FIRST.match(lines[0]) if lines else None
    if m is None:
        return {"message": message.strip().split("\n")[0], "line": 0, "column": 0}
    line, column = int(m["line"]), 0
    if len(lines) > 2 and "^" in lines[2]:
        column = lines[2].index("^") + 1
        if line == 1:
            column -= len(PREFIX)
    text = m["text"]
    last = script.count("\n") + 1
    if line > last:
        own = alone(script) if alone else None
        if own and "Illegal return" not in own:  # (a top-level return is legal in a transform)
            found = position(own, script)
            if found["line"] == 1:
                found["column"] += len(PREFIX) - len(PARSE_ONLY)
            return found
        line, column = last, len(script.rsplit("\n", 1)[-1]) + 1
        text += " (at the end of the script: is a block, a string or a comment not closed?)"
    return {"message": text, "line": line, "column": max(column, 0)}


# Writable memory the process may map beyond the heap's limit: V8 reserves ~550 MiB of address
# space at start (its code range above all; little of it is ever touched), Python and mini-racer
# their own. This bounds what the heap limit does not see: typed arrays' buffers, which V8 keeps
# outside its heap (without it, `new Uint8Array(100e6).fill(1)` in a loop took 6 GB).
DATA_OVERHEAD_MIB = 1024


def _harden(parent: int, memory_mib: int) -> None:
    import ctypes
    import resource
    import signal

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file with rows in it
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no file written, ever
    data = (memory_mib + DATA_OVERHEAD_MIB) * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:  # never above what the worker itself may have
        data = min(data, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (data, data))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG: die with the worker
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace, no /proc/<pid>/mem by others
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the worker died before PR_SET_PDEATHSIG took effect
        os._exit(1)


class _Channel:
    """Frames over two file descriptors, the request buffer reused from one to the next (a new
    one per batch is new memory, whose page faults cost more than the copy)."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.buf = bytearray(1 << 20)

    def _read_into(self, view: memoryview) -> bool:
        got = 0
        while got < len(view):
            n = os.readv(self.rfd, [view[got:]])
            if n == 0:
                return False
            got += n
        return True

    def read(self) -> tuple[bytes, memoryview] | None:
        head = bytearray(HEADER.size)
        if not self._read_into(memoryview(head)):
            return None
        op, size = HEADER.unpack(head)
        if size > len(self.buf):
            self.buf = bytearray(size)
        view = memoryview(self.buf)[:size]
        if not self._read_into(view):
            return None
        return op, view

    def write(self, op: bytes, payload) -> None:
        views = [memoryview(HEADER.pack(op, len(payload))), memoryview(payload)]
        while views:
            n = os.writev(self.wfd, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]


def main(argv: list[str]) -> int:
    memory_mib, timeout_s, parent = int(argv[1]), float(argv[2]), int(argv[3])
    _harden(parent, memory_mib)
    # The frames go over a descriptor of their own; anything else writing to stdout (V8, a
    # library) lands on stderr instead of in the middle of a frame.
    rfd, wfd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    from py_mini_racer import JSFunction, JSOOMException, JSParseException, JSTimeoutException, MiniRacer
    from py_mini_racer._dll import init_mini_racer
    from py_mini_racer._exc import JSEvalException

    # The old generation's limit is where V8 gives up and ends this process; mini-racer's hard
    # limit (below it) stops a script at a garbage collection with an error this process
    # reports. The margin lets the second act first whenever it can.
    init_mini_racer(flags=("--single-threaded", f"--max-old-space-size={memory_mib + 64}"), ignore_duplicate_init=True)
    mr = MiniRacer()
    mr.set_hard_memory_limit(memory_mib * 2**20)
    add, run, progress = mr.eval(PRELUDE)  # progress: a view of pos's memory (mini-racer maps an ArrayBuffer)
    chan = _Channel(rfd, wfd)

    def fail(info: dict) -> None:
        chan.write(b"E", json.dumps(info).encode())

    def parse_alone(script: str) -> str | None:
        # Only after a failed compile: the sandbox ends with it, so what this declares is moot.
        try:
            mr.eval(PARSE_ONLY + script, timeout_sec=timeout_s)
        except JSParseException as e:
            return str(e)
        except Exception:  # parsed (and threw the 0 before any of it ran)
            return None
        return None

    def whereabouts() -> tuple[int, int]:
        row, step = struct.unpack_from("<ii", progress)
        return row, step

    while True:
        frame = chan.read()
        if frame is None:
            return 0
        op, view = frame
        if op == b"C":
            scripts = json.loads(bytes(view))["scripts"]
            for n, script in enumerate(scripts):
                base = {"transform": n, "row": -1}
                try:
                    fn = mr.eval(PREFIX + script + SUFFIX.replace("{n}", str(n + 1)), timeout_sec=timeout_s)
                except JSTimeoutException:
                    fail({**base, "kind": "timeout", "message": "its top-level code ran past the time limit"})
                    break
                except JSOOMException:  # (the parent ends this process after any failure)
                    fail({**base, "kind": "memory", "message": "its top-level code ran past the memory limit"})
                    break
                except JSParseException as e:
                    fail({**base, "kind": "compile", **position(str(e), script, alone=parse_alone)})
                    break
                except JSEvalException as e:  # its top-level code threw, or outgrew the memory limit
                    if mr.was_hard_memory_limit_reached():
                        fail({**base, "kind": "memory", "message": "its top-level code ran past the memory limit"})
                    else:
                        fail({**base, "kind": "load", **position(str(e), script)})
                    break
                if not isinstance(fn, JSFunction):
                    fail({**base, "kind": "no_transform", "message": "it defines no function named transform"})
                    break
                add(fn)
            else:
                chan.write(b"K", json.dumps({"v8": mr.v8_version}).encode())
        elif op == b"R":
            chunk, first = RUN_HEAD.unpack_from(view)
            text = str(view[RUN_HEAD.size :], "utf-8")
            try:
                result = run(text, chunk, first, timeout_sec=timeout_s)
            except JSTimeoutException:
                row, step = whereabouts()
                fail({"kind": "timeout", "transform": step, "row": row})
                continue
            except JSEvalException as e:
                # mini-racer's hard memory limit terminates the script: that arrives here (as
                # JSOOMException, or as an error whose value is null). Anything else escaped the
                # prelude's own guard: not the script's doing.
                if isinstance(e, JSOOMException) or mr.was_hard_memory_limit_reached():
                    row, step = whereabouts()
                    fail({"kind": "memory", "transform": step, "row": row})
                else:
                    fail({"kind": "engine", "transform": -1, "row": -1, "message": str(e).split("\n")[0]})
                continue
            if mr.was_hard_memory_limit_reached():  # what the script saw then is no result
                row, step = whereabouts()
                fail({"kind": "memory", "transform": step, "row": row})
                continue
            data = result.encode()
            chan.write(data[:1], memoryview(data)[1:])
        else:
            fail({"kind": "protocol", "message": f"unknown operation {op!r}"})
            return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
