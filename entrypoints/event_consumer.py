"""`marquee events consume`: the NATS JetStream intake of events (docs/events.md).

Publishers publish an EventIn JSON body to `<prefix>.events.<type>`; the stream
<PREFIX>_EVENTS keeps it until the durable pull consumer <prefix>-intake acks it. This edge
parses the body, calls services.events.accept and maps its errors; accept stores the event
and starts its workflow (and commits) before the ack, so a crash before the ack means a
redelivery, and a redelivery is a replay of the same event id: nothing is done twice.

What can never succeed (bad JSON, a body EventIn refuses, an unknown type, a payload its
schema refuses, an id reused with other content) goes at once to the dead-letter subject
<prefix>.dead.events (kept by the stream <PREFIX>_EVENTS_DEAD), its body unchanged and headers
naming the reason, and is terminated. What may succeed later (Temporal or PostgreSQL down) is
nak'ed with a growing delay, and dead-lettered on its last allowed delivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from core.config import Settings
from core.db import create_engine
from core.errors import Conflict, Invalid, Unavailable
from core.schemas import EventIn
from core.temporal import connect
from services import events
from services.metrics import EVENTS_REJECTED

SOURCE = "nats"
LOCAL_URL = "nats://127.0.0.1:4222"  # MARQUEE_NATS_URL unset
FETCH_BATCH = 32  # messages asked for per pull, at most the free handler slots
CONCURRENCY = 8  # events accepted at once (each holds a database connection)
FETCH_SECONDS = 1.0  # a pull waits this long for messages; also how soon a stop is noticed
RETRY_DELAY_CAP_SECONDS = 60.0  # a transient failure is redelivered after 2, 4, 8 ... seconds, up to this
EVENTS_MAX_AGE_SECONDS = 7 * 24 * 3600.0  # acked or not, the stream forgets a message after a week
DEAD_MAX_AGE_SECONDS = 30 * 24 * 3600.0

logger = structlog.get_logger("marquee.events.nats")


class NatsUnavailable(Exception):
    """NATS did not answer, or has no JetStream."""


@dataclass(frozen=True)
class Names:
    """Subjects, streams and the durable consumer, all derived from MARQUEE_NATS_PREFIX (tests use
    a prefix of their own, so they never consume the machine's other traffic)."""

    prefix: str

    @property
    def subjects(self) -> str:
        return f"{self.prefix}.events.>"

    def subject(self, event_type: str) -> str:
        return f"{self.prefix}.events.{event_type}"

    @property
    def dead_subject(self) -> str:
        return f"{self.prefix}.dead.events"

    @property
    def stream(self) -> str:
        return f"{self.prefix.upper()}_EVENTS"

    @property
    def dead_stream(self) -> str:
        return f"{self.prefix.upper()}_EVENTS_DEAD"

    @property
    def durable(self) -> str:
        return f"{self.prefix}-intake"


def nats_url(settings: Settings) -> str:
    return settings.nats_url or LOCAL_URL


def shown(url: str) -> str:
    """The URL(s) without credentials, for logs and the dev banner."""
    return ",".join(re.sub(r"//[^@/]*@", "//", server) for server in url.split(","))


async def connect_nats(url: str, wait_seconds: float) -> NATS:
    """A connection that reconnects forever once made; the first one is given `wait_seconds`."""
    connected = False
    last_error: list[BaseException] = []

    async def on_error(err: Exception) -> None:
        last_error[:] = [err]
        if connected:  # attempts before the first connection are reported once, by the caller
            logger.warning("nats connection error", error=str(err))

    async def on_disconnect() -> None:
        logger.warning("nats disconnected, reconnecting", url=shown(url))

    async def on_reconnect() -> None:
        logger.info("nats reconnected", url=shown(url))

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                [server.strip() for server in url.split(",") if server.strip()],
                name="marquee-intake",
                connect_timeout=min(2.0, wait_seconds),
                reconnect_time_wait=1.0,
                max_reconnect_attempts=-1,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            ),
            wait_seconds,
        )
    except (TimeoutError, OSError, nats.errors.Error) as err:
        reason = last_error[0] if last_error else err
        raise NatsUnavailable(f"NATS at {shown(url)} did not answer within {wait_seconds:g} s ({reason})") from err
    connected = True
    return nc


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or set our fields on it and keep the operator's (replicas, storage...)."""
    try:
        info = await js.stream_info(config.name or "")
    except NotFoundError:
        await js.add_stream(config)
        return
    wanted = dataclasses.replace(info.config, subjects=config.subjects, max_age=config.max_age)
    if wanted != info.config:
        await js.update_stream(wanted)


async def ensure_streams(js: JetStreamContext, names: Names, settings: Settings) -> None:
    """The event and dead-letter streams and the durable consumer, created or brought up to
    date (ack wait, max deliveries); safe to run at every start, by every consumer process."""
    await _ensure_stream(js, StreamConfig(name=names.stream, subjects=[names.subjects],
                                          max_age=EVENTS_MAX_AGE_SECONDS))  # fmt: skip
    await _ensure_stream(js, StreamConfig(name=names.dead_stream, subjects=[names.dead_subject],
                                          max_age=DEAD_MAX_AGE_SECONDS))  # fmt: skip
    await js.add_consumer(
        names.stream,
        ConsumerConfig(
            durable_name=names.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=settings.events_ack_wait_seconds,
            max_deliver=settings.events_max_deliver,
            filter_subject=names.subjects,
        ),
    )


def _one_line(text: str, limit: int = 1000) -> str:
    return " ".join(text.split())[:limit]  # header values: no CR/LF


class EventConsumer:
    """Pulls messages in bounded batches and handles up to `concurrency` at once."""

    def __init__(
        self,
        nc: NATS,
        engine: AsyncEngine,
        temporal: Client,
        settings: Settings,
        *,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._engine = engine
        self._temporal = temporal
        self._settings = settings
        self._names = Names(settings.nats_prefix)
        self._concurrency = concurrency

    @property
    def names(self) -> Names:
        return self._names

    async def prepare(self) -> None:
        try:
            await ensure_streams(self._js, self._names, self._settings)
        except nats.errors.Error as err:  # e.g. a server without JetStream
            raise NatsUnavailable(f"JetStream at {self._nc.connected_url}: {err}") from err

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; then handlers in flight get one ack wait to finish (an unfinished
        one is redelivered to another consumer later)."""
        sub = await self._js.pull_subscribe_bind(self._names.durable, stream=self._names.stream)
        inflight: set[asyncio.Task[None]] = set()
        logger.info("event consumer started", stream=self._names.stream, durable=self._names.durable,
                    subjects=self._names.subjects)  # fmt: skip
        try:
            while not stop.is_set():
                free = self._concurrency - len(inflight)
                if free <= 0:
                    await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    # Only as many as can start now: a fetched message never waits out its ack wait.
                    messages = await sub.fetch(min(free, FETCH_BATCH), timeout=FETCH_SECONDS)
                except nats.errors.TimeoutError:
                    continue
                except Exception:  # NATS reconnecting, JetStream restarting: keep trying
                    logger.exception("fetching events failed")
                    await asyncio.sleep(FETCH_SECONDS)
                    continue
                for msg in messages:
                    task = asyncio.create_task(self.handle(msg))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
        finally:
            if inflight:
                _, unfinished = await asyncio.wait(inflight, timeout=self._settings.events_ack_wait_seconds)
                for task in unfinished:
                    task.cancel()
            await sub.unsubscribe()
            logger.info("event consumer stopped")

    async def handle(self, msg: Msg) -> None:
        """Accept, then ack; dead-letter what can never be accepted; nak what may be later."""
        try:
            event = EventIn.model_validate_json(msg.data)
        except ValidationError as err:
            EVENTS_REJECTED.labels(source=SOURCE, reason="malformed").inc()
            problems = [
                (".".join(str(part) for part in error["loc"]) or "body", error["msg"]) for error in err.errors()
            ]
            await self._dead_letter(msg, "malformed", problems)
            return
        try:
            async with self._engine.connect() as conn:
                accepted = await events.accept(
                    conn, self._temporal, self._settings, f"nats:{msg.subject}", event, SOURCE
                )
        except Invalid as err:
            await self._dead_letter(msg, events.rejection_reason(err), err.problems)
            return
        except Conflict as err:
            await self._dead_letter(msg, events.rejection_reason(err), [("id", err.detail)])
            return
        except Unavailable as err:
            await self._retry(msg, err.detail)
            return
        except Exception as err:  # PostgreSQL down, a bug: retried, then dead-lettered
            EVENTS_REJECTED.labels(source=SOURCE, reason="error").inc()
            logger.exception("event intake failed", event_id=event.id)
            await self._retry(msg, f"{type(err).__name__}: {err}")
            return
        if accepted.replayed:
            logger.info("event redelivered, accepted before", event_id=event.id,
                        deliveries=msg.metadata.num_delivered)  # fmt: skip
        await msg.ack()  # only now: the row is committed and the workflow started

    async def _retry(self, msg: Msg, detail: str) -> None:
        delivered = msg.metadata.num_delivered or 1
        if delivered >= self._settings.events_max_deliver:
            await self._dead_letter(msg, "redelivery_exhausted", [],
                                    f"redelivery exhausted after {delivered} deliveries; last: {detail}")  # fmt: skip
            return
        delay = min(2.0**delivered, RETRY_DELAY_CAP_SECONDS)
        logger.warning("event intake will be retried", detail=detail, deliveries=delivered, delay_seconds=delay)
        await msg.nak(delay=delay)

    async def _dead_letter(self, msg: Msg, reason: str, problems: list[tuple[str, str]], detail: str = "") -> None:
        """The original body to the dead-letter subject, then terminate the message. Published
        first: a crash between the two redelivers it, and the dead-letter stream drops the
        copy by its Nats-Msg-Id (within its duplicate window)."""
        meta = msg.metadata
        sequence = meta.sequence.stream if meta.sequence else 0
        headers = {key: value for key, value in (msg.headers or {}).items() if not key.startswith("Nats-")}
        headers.update({
            "Marquee-Reason": reason,
            "Marquee-Detail": _one_line(detail or "; ".join(f"{field}: {message}" for field, message in problems)),
            "Marquee-Subject": msg.subject,
            "Marquee-Stream-Sequence": str(sequence),
            "Marquee-Deliveries": str(meta.num_delivered),
            "Nats-Msg-Id": f"{self._names.stream}:{sequence}",
        })  # fmt: skip
        if problems:
            headers["Marquee-Field"] = _one_line(",".join(dict.fromkeys(field for field, _ in problems)))
        try:
            await self._js.publish(self._names.dead_subject, msg.data, headers=headers, stream=self._names.dead_stream)
        except Exception:  # not terminated: it comes back, and is dead-lettered then
            logger.exception("dead-lettering an event failed", reason=reason)
            if (meta.num_delivered or 1) < self._settings.events_max_deliver:
                await msg.nak(delay=min(2.0 ** (meta.num_delivered or 1), RETRY_DELAY_CAP_SECONDS))
            return
        await msg.term()
        logger.warning("event dead-lettered", reason=reason, detail=headers["Marquee-Detail"], subject=msg.subject,
                       sequence=sequence)  # fmt: skip


async def open_consumer(
    settings: Settings, engine: AsyncEngine, temporal: Client, wait_seconds: float
) -> tuple[EventConsumer, Callable[[], Awaitable[None]]]:
    """Connect to NATS and make the streams; the consumer and what closes its connection.
    Raises NatsUnavailable."""
    nc = await connect_nats(nats_url(settings), wait_seconds)
    consumer = EventConsumer(nc, engine, temporal, settings, concurrency=min(CONCURRENCY, settings.database_pool_size))
    try:
        await consumer.prepare()
    except BaseException:
        await nc.close()
        raise
    return consumer, nc.drain  # drain: the last acks are flushed before it closes


async def run_consumer(settings: Settings, wait_seconds: float = 10.0) -> None:
    """`marquee events consume`: until SIGINT or SIGTERM."""
    assert settings.database_url, "checked by the CLI"
    temporal = await connect(settings)
    engine = create_engine(settings.database_url, settings.database_pool_size)
    try:
        consumer, close = await open_consumer(settings, engine, temporal, wait_seconds)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await consumer.run(stop)
        finally:
            await close()
    finally:
        await engine.dispose()
