"""beam-jobrunner stage | transport | preview (docs/worker-contract.md, beam_contract.worker).

Every run ends with a one-line termination message and the contract's exit code: 0 done,
1 unexpected error, 2 permanent failure, 3 transient failure that outlived its retries.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from beam_contract import logs
from beam_contract.worker import Command, Env, ExitCode, failure_message
from beam_jobrunner.config import termination_path
from beam_jobrunner.errors import JobError

log = logging.getLogger("beam_jobrunner")


def _terminate(message: str) -> None:
    try:
        with open(termination_path(), "w") as f:
            f.write(message)
    except OSError as e:  # outside Kubernetes there may be no termination log; stderr still has it
        log.debug("cannot write termination message: %s", e)


def _since_process_start() -> float | None:
    """Seconds since this process was created (Linux: /proc), for the start-up's cost."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rpartition(")")[2].split()[19])  # field 22: starttime, in ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - started / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None


def _run(command: Command) -> dict:
    if command == Command.PREVIEW:  # no staging URI, key or bucket: a preview writes no files
        from beam_jobrunner import preview
        from beam_jobrunner.config import PreviewConfig

        return preview.run(PreviewConfig.from_env())
    from beam_jobrunner.config import Common

    common = Common.from_env()
    if command == Command.STAGE:
        from beam_jobrunner import stage

        return stage.run(common)
    from beam_jobrunner import transport

    return transport.run(common)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beam-jobrunner", description=__doc__.splitlines()[0])
    parser.add_argument("command", type=Command, choices=list(Command))
    args = parser.parse_args(argv)
    from beam_jobrunner import log_tail, termination

    termination.install(_terminate)
    # One JSON object per line in a Pod, each with the backfill it works for (beam_contract.logs).
    logs.configure(
        os.environ.get("BEAM_LOG_LEVEL", "INFO"),
        fixed={
            "namespace": os.environ.get(Env.NAMESPACE),
            "name": os.environ.get(Env.BACKFILL),
            "job_id": os.environ.get(Env.JOB_ID),
            "phase": args.command.value,
            # A transport worker's lines about one chunk carry `chunk` too (transport.run).
            "worker": os.environ.get(Env.COMPLETION_INDEX) if args.command == Command.TRANSPORT else None,
        },
    )
    log_tail.install()  # after configure, which replaces the root logger's handlers
    if (since := _since_process_start()) is not None:
        log.info("%s: started %.2fs after the process (interpreter and imports)", args.command, since)
    # httpx logs every request's full URL at INFO, query string included: webhook URLs may
    # carry tokens there. Our own log lines name endpoints through sinks.redact_url().
    for noisy in ("httpx", "httpcore", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = _run(args.command)
    except JobError as e:
        log.error("%s", log_tail.mask(e.message))
        _terminate(log_tail.termination_message(failure_message(e.message, e.chunk)))
        return e.exit_code
    except Exception as e:
        log.exception("%s failed unexpectedly", args.command)
        error = log_tail.cut(" ".join(f"{args.command}: unexpected error: {type(e).__name__}: {e}".split()), 1000)
        _terminate(log_tail.termination_message(failure_message(error, getattr(e, "chunk", None))))
        return ExitCode.BUG
    line = json.dumps(result, separators=(",", ":"))
    print(line, flush=True)
    _terminate(line)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
