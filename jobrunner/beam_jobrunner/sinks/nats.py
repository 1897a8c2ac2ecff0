"""NATS JetStream: every row published to the destination's subject and acknowledged by its stream.

Nats-Msg-Id = the row's unique_id, so JetStream drops a resend within the stream's duplicate
window (2 minutes by default; raise `duplicate_window` on the stream to cover reruns). Delivery
is at-least-once beyond that window. The stream must already cover the subject: with no stream
the chunk fails permanently (exit 2), since no retry can create one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from urllib.parse import urlsplit

from beam_jobrunner import reach
from beam_jobrunner.errors import PermanentError, TransientError, excerpt
from beam_jobrunner.sinks import Batch, Sink, markers, redact_url

log = logging.getLogger("beam_jobrunner.nats")

WINDOW = int(os.environ.get("BEAM_NATS_WINDOW", "2000"))  # unacknowledged publishes in flight
ATTEMPTS = 5


class NatsSink(Sink):
    def open(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.where = ",".join(redact_url(u) for u in self.dest.url.split(","))
        auth = {}
        if self.dest.secret:
            # NATS sends a user's password or token in clear to the server it connects to.
            for url in self.dest.url.split(","):
                u = urlsplit(url.strip())
                self.check_secret_bound(u.hostname or "", u.port or 4222)
            token = self.secret("token")
            if token:
                auth["token"] = token
            else:
                auth["user"] = self.require_secret("user")
                auth["password"] = self.require_secret("password")
        self.loop.run_until_complete(self._connect(auth))

    async def _connect(self, auth: dict) -> None:
        import nats
        from nats.errors import NoServersError

        async def quiet(e):  # nats-py logs every reconnect error; the termination message says it once
            # Refused is a BaseException nats-py does not catch; should one ever reach this callback,
            # end the connect here rather than let nats-py retry the server until the timeout.
            if isinstance(e, reach.Refused):
                raise e

        t = self.ctx.connect_timeout
        try:
            self.nc = await asyncio.wait_for(
                nats.connect(
                    servers=self.dest.url.split(","),
                    connect_timeout=min(t, 10),
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    error_cb=quiet,
                    **auth,
                ),
                timeout=t,
            )
        except (TimeoutError, NoServersError, OSError) as e:
            raise TransientError(
                f"{self.label}: server {self.where} unreachable after {t:.0f}s ({type(e).__name__})"
            ) from None
        except Exception as e:
            if "authorization" in str(e).lower():
                raise PermanentError(f"{self.label}: {self.where} refused the credentials: {excerpt(str(e))}") from None
            raise TransientError(f"{self.label}: cannot connect to {self.where}: {excerpt(str(e))}") from None
        self.js = self.nc.jetstream(timeout=max(t, 10), publish_async_max_pending=WINDOW)

    def already_delivered(self) -> bool:
        return markers.is_delivered(self.ctx)

    async def _publish(self, values: list[str], keys: list) -> None:
        import nats.js.errors as jserr

        subject = self.dest.name
        todo = list(range(len(values)))
        for attempt in range(1, ATTEMPTS + 1):
            futures = []
            for i in todo:
                hdr = {"Nats-Msg-Id": keys[i]} if keys[i] is not None else None
                futures.append(await self.js.publish_async(subject, values[i].encode(), headers=hdr))
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*futures, return_exceptions=True), timeout=self.ctx.connect_timeout
                )
            except TimeoutError:
                results = [f.result() if f.done() and not f.exception() else TimeoutError() for f in futures]
            failed = [i for i, r in zip(todo, results, strict=True) if isinstance(r, BaseException)]
            if not failed:
                return
            first = next(r for r in results if isinstance(r, BaseException))
            if (
                isinstance(first, jserr.APIError)
                and getattr(first, "code", None)
                and first.code < 500
                and first.code != 408
            ):
                raise PermanentError(f"{self.label}: {excerpt(str(first))}")
            if attempt == ATTEMPTS:
                raise TransientError(
                    f"{self.label}: {len(failed)} messages not acknowledged after {ATTEMPTS} attempts "
                    f"({type(first).__name__} {excerpt(str(first))})"
                )
            log.warning("%s: %d unacknowledged, retrying", self.label, len(failed))
            await asyncio.sleep(0.5 * attempt)
            todo = failed

    async def _check_stream(self) -> None:
        import nats.js.errors as jserr

        try:
            await self.js.find_stream_name_by_subject(self.dest.name)
        except jserr.NotFoundError:
            raise PermanentError(
                f"{self.label}: no JetStream stream on {self.where} covers subject {self.dest.name!r}"
            ) from None

    def deliver(self, batches: Iterable[Batch]) -> int:
        self.loop.run_until_complete(self._check_stream())
        nbytes = rows = 0
        for batch in batches:
            for i in range(0, len(batch.values), WINDOW):
                self.loop.run_until_complete(self._publish(batch.values[i : i + WINDOW], batch.keys[i : i + WINDOW]))
            rows += len(batch.values)
            nbytes += batch.nbytes
        markers.mark_delivered(self.ctx, rows, nbytes)
        return nbytes

    def close(self) -> None:
        nc = getattr(self, "nc", None)
        if nc is not None:
            self.loop.run_until_complete(nc.close())
        if hasattr(self, "loop"):
            self.loop.close()
