"""The embedding cache's shared level in Redis: every worker reads what any worker encoded.

Bounded three ways: each entry expires `ttl_s` after its last write, entries over `max_entry_bytes` are not stored,
and the total stays under `max_bytes` (an insert evicts the least recently used entries first, atomically in Lua).

    t2i:emb:{key}     safetensors bytes of one prompt's embeddings (see service.models.embedding_cache)
    t2i:emb:lru       zset: entry key -> last use (unix time)
    t2i:emb:sizes     hash: entry key -> bytes
    t2i:emb:bytes     total bytes of the entries in the index
"""

from __future__ import annotations

import logging
import time

import redis

from service import queue

log = logging.getLogger(__name__)

# KEYS: lru, sizes, bytes, entry ; ARGV: data, ttl, now, max bytes
PUT = """
local size = string.len(ARGV[1])
redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], KEYS[4])
local old = tonumber(redis.call('HGET', KEYS[2], KEYS[4]) or '0')
redis.call('HSET', KEYS[2], KEYS[4], size)
local total = redis.call('INCRBY', KEYS[3], size - old)
while total > tonumber(ARGV[4]) do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not oldest or oldest == KEYS[4] then break end
  local bytes = tonumber(redis.call('HGET', KEYS[2], oldest) or '0')
  redis.call('DEL', oldest)
  redis.call('ZREM', KEYS[1], oldest)
  redis.call('HDEL', KEYS[2], oldest)
  total = redis.call('DECRBY', KEYS[3], bytes)
end
return total
"""


class RedisEmbeddingStore:
    def __init__(self, client: redis.Redis, *, max_bytes: int, ttl_s: int, max_entry_bytes: int):
        self.client = client
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self._put = client.register_script(PUT)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        try:
            values = self.client.mget([queue.embedding_cache_key(k) for k in keys])
            hits = [queue.embedding_cache_key(k) for k, v in zip(keys, values) if v is not None]
            if hits:
                self.client.zadd(queue.EMBEDDING_LRU, {h: time.time() for h in hits})
            return values
        except redis.RedisError as exc:  # the cache is an optimisation: never fail a job for it
            log.warning("embedding cache unavailable: %s", exc)
            return [None] * len(keys)

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_entry_bytes:
            return
        try:
            self._put(keys=[queue.EMBEDDING_LRU, queue.EMBEDDING_SIZES, queue.EMBEDDING_BYTES,
                            queue.embedding_cache_key(key)],
                      args=[value, self.ttl_s, time.time(), self.max_bytes])
        except redis.RedisError as exc:
            log.warning("embedding cache unavailable: %s", exc)
