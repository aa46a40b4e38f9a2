"""The API's side of the queue (async): enqueue, look up, cancel, wait, stream events, see live workers.

Key names and the atomic scripts are in `service.queue`; this module only calls them.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis

from service import queue
from service.errors import ConflictError, NotFoundError, OverloadedError
from service.jobs import JobStatus, decode_hash, event

ANONYMOUS = "anonymous"  # the owner of everything when no API keys are configured (service.api.auth)


@dataclass(frozen=True)
class Enqueued:
    """What `QueueClient.enqueue` did: the job's id; `created` is False when the Idempotency-Key named an existing
    job. A new job comes with the fields just stored and its queue position, so a 202 needs no read of its own."""

    id: str
    created: bool
    fields: dict[str, str] | None = None
    position: int | None = None


class QueueClient:
    def __init__(self, client: aioredis.Redis, *, max_queue: int, result_ttl_s: int, upload_ttl_s: int = 3600):
        self.client = client
        self.max_queue = max_queue
        self.result_ttl_s = result_ttl_s
        self.upload_ttl_s = upload_ttl_s
        self._workers: list[dict] = []
        self._workers_at = float("-inf")
        self._enqueue = client.register_script(queue.ENQUEUE)
        self._cancel = client.register_script(queue.CANCEL)

    async def enqueue(self, request: dict, idempotency_key: str | None = None, *, result_ttl_s: int | None = None,
                      keep_embedding: bool = False, owner: str = ANONYMOUS) -> Enqueued:
        """Queue a job in one round trip. `result_ttl_s` keeps this job's result longer than the default;
        `keep_embedding` stores its prompt's T5 embedding with it (compare runs use both)."""
        job_id = secrets.token_urlsafe(16)  # unguessable
        now, body = time.time(), json.dumps(request)
        kind, value, *position = await self._enqueue(
            keys=[queue.QUEUED, queue.SEQ, queue.job_key(job_id), queue.stream_key(request["pipeline"],
                  request["encoder"]), queue.idem_key(f"{owner}:{idempotency_key}") if idempotency_key else ""],
            args=[job_id, self.max_queue, self.result_ttl_s, now, body, queue.GROUP, result_ttl_s or "",
                  "1" if keep_embedding else "0", owner],
        )
        kind, value = _s(kind), _s(value)
        if kind == "full":
            raise OverloadedError(f"queue is full: {value} jobs queued, T2I_MAX_QUEUE={self.max_queue}", retry_after=2)
        if kind == "dup":
            return Enqueued(value, created=False)
        # the fields the script stored that a view reads (the rest are the workers')
        fields = {"id": job_id, "status": "queued", "request": body, "created_at": repr(now), "attempts": "0",
                  "owner": owner}
        return Enqueued(job_id, created=True, fields=fields, position=int(position[0]))

    async def fields(self, job_id: str, owner: str | None = None) -> dict[str, str]:
        """The job's stored fields; 404 when it is unknown, expired, or (with `owner`) another key's."""
        return _owned(job_id, decode_hash(await self.client.hgetall(queue.job_key(job_id))), owner)

    async def position(self, job_id: str) -> int | None:
        return await self.client.zrank(queue.QUEUED, job_id)

    async def depth(self) -> int:
        return await self.client.zcard(queue.QUEUED)

    async def image(self, job_id: str, n: int) -> bytes | None:
        return await self.client.get(queue.image_key(job_id, n))

    async def put_upload(self, data: bytes, owner: str = ANONYMOUS) -> str:
        """Store a (checked) control image; returns its unguessable id."""
        upload_id = secrets.token_urlsafe(16)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(queue.upload_key(upload_id), data, ex=self.upload_ttl_s)
        pipe.set(queue.upload_owner_key(upload_id), owner, ex=self.upload_ttl_s)
        await pipe.execute()
        return upload_id

    async def upload(self, upload_id: str, owner: str = ANONYMOUS) -> bytes | None:
        """The upload's bytes; None when unknown, expired or another key's."""
        stored_owner, data = await self.client.mget(queue.upload_owner_key(upload_id), queue.upload_key(upload_id))
        return data if stored_owner is not None and _s(stored_owner) == owner else None

    async def keep_upload(self, upload_id: str, owner: str = ANONYMOUS) -> bool:
        """Restart an upload's time to live (a job now needs it); False when it is unknown, expired or another
        key's."""
        stored_owner = await self.client.get(queue.upload_owner_key(upload_id))
        if stored_owner is None or _s(stored_owner) != owner:
            return False
        pipe = self.client.pipeline(transaction=True)
        pipe.expire(queue.upload_key(upload_id), self.upload_ttl_s)
        pipe.expire(queue.upload_owner_key(upload_id), self.upload_ttl_s)
        return all(await pipe.execute())

    async def cancel(self, job_id: str) -> str:
        result = _s(await self._cancel(keys=[queue.job_key(job_id), queue.QUEUED],
                                       args=[job_id, time.time(), self.result_ttl_s,
                                             queue.CANCEL_CHANNEL_PREFIX]))
        if result == "gone":
            raise NotFoundError(f"job {job_id!r} not found (unknown or expired)", field="job_id")
        if result == "cancelled":
            await self.client.publish(queue.events_channel(job_id), event("status", status="cancelled"))
        elif result != "cancelling":
            raise ConflictError(f"job {job_id!r} has already {result}; nothing to cancel", field="job_id")
        return result

    async def live_workers(self, max_age_s: float = 0.0) -> list[dict]:
        """The facts of every worker with a fresh heartbeat; with `max_age_s`, a list read that recently is reused
        (the submission path asks on every request and refreshes when the list lacks what it needs)."""
        if max_age_s and time.monotonic() - self._workers_at < max_age_s:
            return self._workers
        self._workers = await self._read_workers()
        self._workers_at = time.monotonic()
        return self._workers

    async def waiting(self, pipeline: str, encoders: list[str]) -> dict[str, int]:
        """Jobs queued for each (pipeline, encoder) and not yet handed to a worker: its stream group's lag, read in
        one round trip (0 for a stream that does not exist yet)."""
        pipe = self.client.pipeline(transaction=False)
        for name in encoders:
            pipe.xinfo_groups(queue.stream_key(pipeline, name))
        out = {}
        for name, groups in zip(encoders, await pipe.execute(raise_on_error=False)):
            group = next((g for g in groups if _s(g["name"]) == queue.GROUP), None) if isinstance(groups, list) else None
            out[name] = int(group.get("lag") or 0) if group else 0
        return out

    async def _read_workers(self) -> list[dict]:
        ids = [_s(i) for i in await self.client.zrange(queue.WORKERS, 0, -1)]
        if not ids:
            return []
        raw = await self.client.mget([queue.worker_key(i) for i in ids])
        stale = [i for i, r in zip(ids, raw) if r is None]
        if stale:
            await self.client.zrem(queue.WORKERS, *stale)
        return [json.loads(r) for r in raw if r is not None]

    async def events(self, job_id: str, keepalive_s: float = 15.0) -> AsyncIterator[str | None]:
        """The job's current state, then its events as they happen, until it ends. None = a keep-alive tick."""
        async with self.client.pubsub() as pubsub:
            await pubsub.subscribe(queue.events_channel(job_id))  # subscribe first: no event falls in between
            fields = await self.fields(job_id)
            status = JobStatus(fields["status"])
            if "step" in fields:
                yield event("progress", step=int(fields["step"]), steps=int(fields["steps"]))
            yield event("status", status=status.value)
            if status.terminal:
                return
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=keepalive_s)
                if message is None:
                    fields = await self.fields(job_id)  # a missed final event must not hang the stream
                    if JobStatus(fields["status"]).terminal:
                        yield event("status", status=fields["status"])
                        return
                    yield None
                    continue
                data = _s(message["data"])
                yield data
                parsed = json.loads(data)
                if parsed["type"] == "status" and JobStatus(parsed["status"]).terminal:
                    return

    async def wait(self, job_id: str, timeout_s: float, *, just_queued: bool = False,
                   owner: str | None = None) -> dict[str, str]:
        """The job's fields once it has ended, or as they are when `timeout_s` has passed. One blocking BLMOVE on the
        job's done list (which the finishing script fills), rotating it in place so that every waiter on the same
        job wakes, pipelined with the read of the fields: Redis runs the read when the wait returns, so the answer
        comes in the same round trip. The status is read first unless the job was `just_queued` by this request: a
        job that ended long ago has no done list left (it expires after 300 s), and a wait on it would block."""
        if not just_queued:
            fields = await self.fields(job_id, owner)
            if JobStatus(fields["status"]).terminal:
                return fields
        key = queue.done_key(job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.blmove(key, key, timeout=max(timeout_s, 0.01), src="LEFT", dest="RIGHT")
        pipe.hgetall(queue.job_key(job_id))
        _, raw = await pipe.execute()
        return _owned(job_id, decode_hash(raw), owner)


def _owned(job_id: str, fields: dict[str, str], owner: str | None) -> dict[str, str]:
    """`fields` when the job exists and (with `owner`) is that key's; otherwise 404, the same for both."""
    if not fields or (owner is not None and fields.get("owner", ANONYMOUS) != owner):
        raise NotFoundError(f"job {job_id!r} not found (unknown or expired)", field="job_id")
    return fields


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
