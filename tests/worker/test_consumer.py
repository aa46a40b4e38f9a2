"""The worker's side of the queue, on a real embedded Redis: one read claims the jobs queued on a stream together
(what a batch is made of), so a lone job costs no second read."""

import asyncio

import redis
import redis.asyncio as aioredis

from service import queue
from service.api.queue_client import QueueClient
from service.redis_server import EmbeddedRedis
from service.worker.consumer import Consumer


def test_one_read_claims_the_jobs_queued_on_a_stream_up_to_the_count(tmp_path):
    with EmbeddedRedis(data_dir=tmp_path / "redis") as server:
        async def enqueue(n: int) -> list[str]:
            client = aioredis.Redis.from_url(server.url)
            try:
                queue_client = QueueClient(client, max_queue=100, result_ttl_s=60)
                request = {"prompt": "a fox", "pipeline": "flux", "encoder": "t5-small"}
                return [(await queue_client.enqueue(request)).id for _ in range(n)]
            finally:
                await client.aclose()

        stream = queue.stream_key("flux", "t5-small")
        consumer = Consumer(redis.Redis.from_url(server.url), "w1", [stream], visibility_timeout_s=60, result_ttl_s=60)
        consumer.ensure_groups()
        ids = asyncio.run(enqueue(5))
        first = consumer.claim(block_ms=100, count=3)
        assert [c.job_id for c in first] == ids[:3] and {c.stream for c in first} == {stream}
        assert all(c.entry and c.entry["request"] and not c.redelivered for c in first)
        assert [c.job_id for c in consumer.claim(block_ms=100, count=3)] == ids[3:]  # what was left, not a wait
        assert consumer.claim(block_ms=50, count=3) == []
        assert [c.job_id for c in consumer.claim(block_ms=100)] == []  # one at a time by default: nothing left
        more = asyncio.run(enqueue(2))
        assert [c.job_id for c in consumer.claim(block_ms=100)] == more[:1]
