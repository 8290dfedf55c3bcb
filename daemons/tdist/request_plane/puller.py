"""Credit-based pulls from a JetStream consumer.

A worker asks for as many messages as it has free slots (divided by the requests a
message carries on average, when callers send batches). ``outstanding``
counts messages asked for and not yet delivered: each delivered message takes
one off; a 408 (request expired) or 409 (request refused) status gives back the
``Nats-Pending-Messages`` it names. Delivered messages keep their stream subject,
so they cannot be matched to a pull request; the counts add up regardless.
This is nats.go's continuous "consume" model, kept small and explicit.

No pull request is sent while the connection is down (nats-py would buffer it and
flush it at reconnect, so a worker could be handed more than its slots). After a
reconnect the owner calls ``restart()``: a fresh inbox, so deliveries for pull
requests of the old connection cannot be counted against the new ones.
A 503 (no responders: JetStream or the consumer is not there yet) or a deleted
consumer sets ``consumer_missing``; the owner then re-declares its consumers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from tdist.logs import get_logger
from tdist.request_plane.connection import subscribe_inline

log = get_logger("tdist.puller")

STATUS = "Status"


class Puller:
    def __init__(
        self,
        nc: NatsClient,
        stream: str,
        consumer: str,
        on_message: Callable[[Msg], None],
        on_credit_returned: Callable[[], None],
        *,
        expires: float = 10.0,
    ) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._on_message = on_message
        self._on_credit_returned = on_credit_returned
        self._expires = expires
        self._outstanding = 0
        self._last_request = 0.0
        self._sub: Subscription | None = None
        self.consumer = consumer
        self.consumer_missing = False

    @property
    def outstanding(self) -> int:
        return self._outstanding

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await subscribe_inline(self._nc, self._inbox, self._on_msg)

    async def restart(self) -> None:
        """A fresh inbox and no open pull requests: after a reconnect."""
        await self.stop()
        self.consumer_missing = False
        await self.start()

    def ask(self, batch: int) -> Coroutine[Any, Any, None] | None:
        """Count ``batch`` more messages as asked for now, and return the publish that asks the
        server (None: nothing to ask, or disconnected).

        The count is taken at once, not when the publish runs: several slots freed in one pass
        of the event loop would otherwise each ask for the same free slots."""
        if batch <= 0 or self._sub is None or not self._nc.is_connected:
            return None
        self._outstanding += batch
        self._last_request = time.monotonic()
        body = json.dumps({"batch": batch, "expires": int(self._expires * 1e9)}).encode()
        return self._publish(body, batch)

    async def _publish(self, body: bytes, batch: int) -> None:
        try:
            await self._nc.publish(self._next_subject, body, reply=self._inbox)
        except Exception as exc:  # not sent: nothing will come for it
            self._outstanding = max(0, self._outstanding - batch)
            log.info("pull_request_not_sent", consumer=self.consumer, error=str(exc))

    def forget_stale(self) -> None:
        """Every pull request has expired by now: a count left over was lost (a reconnect)."""
        if self._outstanding and time.monotonic() - self._last_request > self._expires + 5.0:
            self._outstanding = 0
            self._on_credit_returned()

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        self._outstanding = 0
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closed
                pass

    def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and STATUS in headers and not msg.data:
            status = headers[STATUS]
            if status == "100":  # idle heartbeat
                return
            try:
                returned = int(headers.get("Nats-Pending-Messages", "0"))
            except ValueError:
                returned = 0
            if status == "503" or (status == "409" and "Consumer Deleted" in headers.get("Description", "")):
                self.consumer_missing = True
                returned = self._outstanding
            elif status not in ("404", "408", "409"):
                log.warning("pull_status", consumer=self.consumer, status=status, description=headers.get("Description"))
            self._outstanding = max(0, self._outstanding - returned)
            self._on_credit_returned()
            return
        if self._outstanding > 0:
            self._outstanding -= 1
        self._on_message(msg)
