"""The worker's side of the queue: claim, start, report progress, finish, keep claims fresh, take over the dead's.

Synchronous redis-py: a worker does one job at a time, and its heartbeat thread shares the client's pool. A third
thread listens on the worker's cancel channel, so that a denoising step learns of a cancel without a round trip.
A new job's stream entry carries its request, so its start script is sent without waiting for the answer
(`start_unanswered`): the worker runs the job meanwhile and reads the answer at the first denoising step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from service import queue
from service.jobs import JobStatus, decode_hash, event

log = logging.getLogger(__name__)


@dataclass
class Claim:
    """A stream entry this worker holds; `redelivered` when it was taken over from a silent worker. `entry` is the
    job as the API queued it (request, created_at, keep_embedding, ttl), None for an entry that carries the id only
    (queued by an API from before entries carried requests)."""

    stream: str
    entry_id: str
    job_id: str
    redelivered: bool = False
    entry: dict[str, str] | None = None


class Consumer:
    def __init__(self, client: redis.Redis, worker_id: str, streams: list[str], *, visibility_timeout_s: float,
                 result_ttl_s: int):
        self.client = client
        self.worker_id = worker_id
        self.streams = streams
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.result_ttl_s = result_ttl_s
        self._start = client.register_script(queue.START)
        self._finish = client.register_script(queue.FINISH)
        self._last_reclaim = 0.0
        self.cancels: dict[str, float] = {}  # job id -> when its cancel message came
        self._listener = None

    def ensure_groups(self) -> None:
        """The consumer group on every stream, and the job scripts loaded into the server, so that the first job's
        start script, sent unanswered, does not meet NOSCRIPT on a fresh server."""
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, queue.GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        for script in (self._start, self._finish):
            script.sha = self.client.script_load(script.script)

    def upload(self, upload_id: str) -> bytes | None:
        """An uploaded control image's bytes; None once it has expired."""
        return self.client.get(queue.upload_key(upload_id))

    def store_embedding(self, job_id: str, data: bytes, ttl_s: int) -> None:
        """The prompt's T5 embeddings (float16), kept beside the job's images for compare runs."""
        self.client.set(queue.embedding_key(job_id), data, ex=ttl_s)

    # -- claiming ----------------------------------------------------------------------------------------------
    def claim(self, block_ms: int, count: int = 1) -> list[Claim]:
        """Jobs abandoned by silent workers first (checked every half visibility timeout, one at a time), then new
        ones: up to `count` from each stream, those queued now or, when none is, the first to arrive."""
        now = time.monotonic()
        if now - self._last_reclaim > self.visibility_ms / 2000:
            self._last_reclaim = now
            for stream in self.streams:
                _next, entries, _deleted = self.client.xautoclaim(
                    stream, queue.GROUP, self.worker_id, min_idle_time=self.visibility_ms, start_id="0-0", count=1
                )
                for entry_id, fields in entries:
                    if fields:  # an entry deleted meanwhile comes back without fields
                        return [Claim(stream, _s(entry_id), _s(fields[b"job"]), redelivered=True)]
                    self.client.xack(stream, queue.GROUP, entry_id)
        reply = self.client.xreadgroup(
            queue.GROUP, self.worker_id, {s: ">" for s in self.streams}, count=count, block=block_ms
        )
        claims = []
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                claims.append(Claim(_s(stream), _s(entry_id), _s(fields[b"job"]), entry=_entry(fields)))
        return claims

    def claim_more(self, stream: str, count: int, wait_ms: int) -> list[Claim]:
        """Up to `count` more new jobs from one stream, to batch with a job just claimed from it: those already
        queued, and those that arrive within `wait_ms` (0: no waiting)."""
        claims: list[Claim] = []
        deadline = time.monotonic() + wait_ms / 1000
        while len(claims) < count:
            left_ms = int((deadline - time.monotonic()) * 1000)
            reply = self.client.xreadgroup(queue.GROUP, self.worker_id, {stream: ">"}, count=count - len(claims),
                                           block=left_ms if left_ms > 0 else None)
            entries = [e for _, es in reply or [] for e in es]
            claims += [Claim(stream, _s(entry_id), _s(fields[b"job"]), entry=_entry(fields))
                       for entry_id, fields in entries]
            if not entries or left_ms <= 0:
                break
        return claims

    def refresh(self, claim: Claim) -> None:
        """Reset the idle time of a claim this worker still owns, so a long job is not redelivered."""
        pending = self.client.xpending_range(claim.stream, queue.GROUP, min=claim.entry_id, max=claim.entry_id, count=1)
        if pending and _s(pending[0]["consumer"]) == self.worker_id:
            self.client.xclaim(claim.stream, queue.GROUP, self.worker_id, 0, [claim.entry_id], justid=True)

    def release(self, claim: Claim) -> None:
        pipe = self.client.pipeline()
        pipe.xack(claim.stream, queue.GROUP, claim.entry_id)
        pipe.xdel(claim.stream, claim.entry_id)
        pipe.execute()

    # -- job state ---------------------------------------------------------------------------------------------
    def start(self, claims: list[Claim], now: float | None = None) -> list[tuple[str, dict[str, str]]]:
        """Mark each job running (or learn that it was cancelled or finished meanwhile), announce it and read its
        fields: one script per job, all in one round trip. Returns (status, fields) per claim."""
        return [_started(reply) for reply in self._run(self._start, self._start_calls(claims, now or time.time()))]

    def start_unanswered(self, claims: list[Claim], now: float) -> Callable[[], list[tuple[str, dict[str, str]]]]:
        """Send the start scripts of these jobs (as `start`) on a connection of their own, and return at once: the
        returned call reads the answers (status, fields per claim), and gives the connection back. The caller runs
        the jobs from their entries meanwhile, and reads the answers before it stores anything: a job that was
        cancelled, finished or expired meanwhile is then dropped. A connection error, or a server that has lost the
        script, raises a redis error from either call; the answers are then unknown, and `start` is the fallback (a
        job the first script did mark running is marked again, and counts one more attempt)."""
        pool = self.client.connection_pool
        connection = pool.get_connection()
        calls = self._start_calls(claims, now)
        try:
            connection.send_packed_command(connection.pack_commands(
                [("EVALSHA", self._start.sha, len(keys), *keys, *args) for keys, args in calls]))
        except BaseException:
            connection.disconnect()
            pool.release(connection)
            raise

        def answers() -> list[tuple[str, dict[str, str]]]:
            try:
                replies = [connection.read_response() for _ in calls]
            except BaseException:
                connection.disconnect()  # replies may be left unread on it
                raise
            finally:
                pool.release(connection)
            return [_started(reply) for reply in replies]

        return answers

    def _start_calls(self, claims: list[Claim], now: float) -> list[tuple[list, list]]:
        return [([queue.job_key(claim.job_id), queue.QUEUED],
                 [claim.job_id, self.worker_id, now, self.result_ttl_s, queue.events_channel(claim.job_id),
                  event("status", status="running", worker=self.worker_id), event("status", status="cancelled")])
                for claim in claims]

    def step(self, job_ids: list[str], step: int, steps: int, *, report: bool) -> list[bool]:
        """Whether each job of a batch was cancelled, at a denoising step. A step that reports progress (`report`)
        writes and announces it and reads the cancel flags, for the whole batch in one round trip; any other step
        makes none and goes by the cancel messages (`listen_for_cancels`). A message lost to a broken connection
        delays a cancel to the next report, at most `T2I_PROGRESS_INTERVAL_S`."""
        pushed = [job_id in self.cancels for job_id in job_ids]
        if not report:
            return pushed
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hset(queue.job_key(job_id), mapping={"step": step, "steps": steps})
            pipe.publish(queue.events_channel(job_id), event("progress", step=step, steps=steps))
        for job_id in job_ids:
            pipe.hget(queue.job_key(job_id), "cancel")
        flags = pipe.execute()[-len(job_ids):]
        return [was_pushed or flag == b"1" for was_pushed, flag in zip(pushed, flags)]

    # -- cancel messages -----------------------------------------------------------------------------------------
    def listen_for_cancels(self) -> None:
        """Subscribe to this worker's cancel channel (the cancel script publishes a running job's id there) and
        collect the ids in `cancels`, in a thread that reconnects and resubscribes after a connection error."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(**{queue.cancel_channel(self.worker_id): self._on_cancel})
        self._listener = pubsub.run_in_thread(sleep_time=1.0, daemon=True, exception_handler=_listener_failed)

    def forget_cancels(self, job_ids: list[str]) -> None:
        """Drop the cancel messages of jobs that have ended here, and any older than the visibility timeout (a job
        that ended before its message came)."""
        oldest = time.monotonic() - self.visibility_ms / 1000
        for job_id in list(self.cancels):
            if job_id in job_ids or self.cancels[job_id] < oldest:
                self.cancels.pop(job_id, None)

    def _on_cancel(self, message: dict) -> None:
        self.cancels[_s(message["data"])] = time.monotonic()

    def finish(self, outcomes: list[tuple[Claim, JobStatus, dict[str, str | int | float], list[bytes]]]
               ) -> list[JobStatus | None]:
        """Store each job's outcome (claim, status, fields, images), announce it (after its last progress, when the
        fields carry `step` and `steps`) and release its claim, atomically per job, all in one round trip. Returns
        per job the status stored (cancelled for a success whose job was cancelled meanwhile), or None when another
        run of the job finished first."""
        cancelled = event("status", status="cancelled", error="job cancelled during denoising",
                          error_type="cancelled")
        calls = []
        for claim, status, fields, images in outcomes:
            flat: list = []
            for key, value in fields.items():
                flat += [key, value]
            announced = event("status", status=status.value, **{k: v for k, v in fields.items()
                                                                 if k in ("error", "error_type")})
            progress = event("progress", step=fields["step"], steps=fields["steps"]) if "step" in fields else ""
            calls.append(([queue.job_key(claim.job_id), claim.stream],
                          [claim.job_id, status.value, time.time(), self.result_ttl_s,
                           queue.events_channel(claim.job_id), announced, cancelled, queue.GROUP, claim.entry_id,
                           progress, len(fields), *flat, *images]))
        return [{0: None, 1: status, 2: JobStatus.cancelled}[int(done)]
                for (_, status, _, _), done in zip(outcomes, self._run(self._finish, calls))]

    def _run(self, script, calls: list[tuple[list, list]]) -> list:
        """One script, once per (keys, args), in one round trip (EVALSHA in a pipeline). A server that does not know
        the script (restarted, or flushed) answers NOSCRIPT to every call, so none ran: load it, then run them."""
        def execute() -> list:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return pipe.execute()

        try:
            return execute()
        except redis.exceptions.NoScriptError:
            script.sha = self.client.script_load(script.script)
            return execute()

    def publish(self, job_id: str, message: str) -> None:
        self.client.publish(queue.events_channel(job_id), message)

    # -- liveness ----------------------------------------------------------------------------------------------
    def heartbeat(self, facts: dict, ttl_s: float) -> None:
        pipe = self.client.pipeline()
        pipe.zadd(queue.WORKERS, {self.worker_id: time.time()})
        pipe.set(queue.worker_key(self.worker_id), json.dumps(facts), px=int(ttl_s * 1000))
        pipe.execute()

    def leave(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        pipe = self.client.pipeline()
        pipe.zrem(queue.WORKERS, self.worker_id)
        pipe.delete(queue.worker_key(self.worker_id))
        pipe.execute()


def _listener_failed(exc: BaseException, _pubsub, _thread) -> None:
    """The cancel listener lost Redis: say so, pause, and let its next read reconnect and resubscribe."""
    log.warning("cancel listener: %s; reconnecting", exc)
    time.sleep(1.0)


def _started(reply: list) -> tuple[str, dict[str, str]]:
    status, flat = reply
    return _s(status), decode_hash(dict(zip(flat[::2], flat[1::2])))


def _entry(fields: dict[bytes, bytes]) -> dict[str, str] | None:
    """The job a stream entry carries (without its id), or None for an entry with the id only."""
    return {_s(k): _s(v) for k, v in fields.items() if k != b"job"} if b"request" in fields else None


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
