"""The job queue in Redis: key names and the atomic operations, in one place.

Why Redis Streams with a consumer group: XREADGROUP hands each job to exactly one live worker and records it as
pending for that worker until XACK; a worker that dies (SIGKILL, power loss) leaves the entry pending, and after the
visibility timeout XAUTOCLAIM gives it to a live worker. That is at-least-once delivery with nothing lost, plus batch
reads for later. A running worker keeps its claim fresh (XCLAIM to itself) so that long jobs are not taken away.

There is one stream per (pipeline, encoder), so a worker reads only what it can serve and jobs that can share a batch
sit together. A sorted set of queued job ids gives queue depth and positions. Every state change is a Lua script, so a
job is never half-enqueued, and a job finished twice (a redelivered duplicate) keeps its first result only.

    t2i:job:{id}                hash: status, request (JSON), timings, ... ; expires `result_ttl_s` after the end
    t2i:job:{id}:image:{n}      bytes of image n
    t2i:job:{id}:done           a list that gets the final status when the job ends (what `?wait=true` blocks on)
    t2i:job:{id}:embedding      the prompt's T5 token embeddings, float16 (jobs of compare runs only)
    t2i:queued                  zset: queued job ids by enqueue order
    t2i:stream:{pipeline}:{enc} stream of jobs (id, request, created_at, keep_embedding, ttl); group `workers`
    t2i:idem:{key}              Idempotency-Key -> job id
    t2i:upload:{id}             bytes of an uploaded control image; expires `upload_ttl_s` after its last use
    t2i:events:{id}             pub/sub channel of a job's progress and status events
    t2i:cancel:{worker id}      pub/sub channel: ids of the worker's running jobs that were just cancelled
    t2i:compares                zset: compare run ids by creation time
    t2i:compare:{id}            JSON of a compare run (its request and its grid of job ids)
    t2i:compare:{id}:cells      hash: cell -> JSON of its metrics, once every job of the cell has ended
    t2i:compare:{id}:votes      hash: voter|cell|encoder|encoder -> left | right | tie (first vote counts)
    t2i:compare:{id}:pair:{t}   JSON of a blind pair served to a voter (which encoder is on which side)
    t2i:emb:...                 the shared prompt-embedding cache (service.worker.embedding_store)
    t2i:rate:{owner}:{minute}   jobs a key queued this minute; t2i:active:{owner} its jobs not yet ended;
    t2i:quota:{owner}:{day}     pixel-steps it used today (service.api.auth)
    t2i:workers                 zset: worker id -> last heartbeat (unix time)
    t2i:worker:{id}             JSON facts of a live worker (expires with its heartbeat)
"""

from __future__ import annotations

PREFIX = "t2i"
GROUP = "workers"
QUEUED = f"{PREFIX}:queued"
SEQ = f"{PREFIX}:seq"
WORKERS = f"{PREFIX}:workers"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def done_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:done"


def image_key(job_id: str, n: int) -> str:
    return f"{PREFIX}:job:{job_id}:image:{n}"


CANCEL_CHANNEL_PREFIX = f"{PREFIX}:cancel:"


def cancel_channel(worker_id: str) -> str:
    return CANCEL_CHANNEL_PREFIX + worker_id


def upload_key(upload_id: str) -> str:
    return f"{PREFIX}:upload:{upload_id}"


def embedding_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:embedding"


def embedding_cache_key(key: str) -> str:
    return f"{PREFIX}:emb:{key}"


EMBEDDING_LRU = f"{PREFIX}:emb:lru"
EMBEDDING_SIZES = f"{PREFIX}:emb:sizes"
EMBEDDING_BYTES = f"{PREFIX}:emb:bytes"


def upload_owner_key(upload_id: str) -> str:
    return f"{PREFIX}:upload:{upload_id}:owner"


def rate_key(owner: str, minute: int) -> str:
    return f"{PREFIX}:rate:{owner}:{minute}"


def active_key(owner: str) -> str:
    return f"{PREFIX}:active:{owner}"


def quota_key(owner: str, day: int) -> str:
    return f"{PREFIX}:quota:{owner}:{day}"


def compare_key(run_id: str) -> str:
    return f"{PREFIX}:compare:{run_id}"


def compare_cells_key(run_id: str) -> str:
    return f"{PREFIX}:compare:{run_id}:cells"


def compare_votes_key(run_id: str) -> str:
    return f"{PREFIX}:compare:{run_id}:votes"


def compare_pair_key(run_id: str, token: str) -> str:
    return f"{PREFIX}:compare:{run_id}:pair:{token}"


COMPARES = f"{PREFIX}:compares"


def stream_key(pipeline: str, encoder: str) -> str:
    return f"{PREFIX}:stream:{pipeline}:{encoder}"


def idem_key(key: str) -> str:
    return f"{PREFIX}:idem:{key}"


def events_channel(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


# KEYS: queued, seq, job, stream, idem ('' for none)
# ARGV: job id, max queue, idempotency ttl, now, request JSON, group, result ttl of this job ('' = the workers'),
#       keep the prompt embedding ('1' | '0'), owner (the API key's owner id)
# -> {'ok', id, position (the jobs queued ahead of it)} | {'dup', existing id} | {'full', depth}
ENQUEUE = """
if KEYS[5] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {'dup', existing} end
end
local depth = redis.call('ZCARD', KEYS[1])
if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[3], 'id', ARGV[1], 'status', 'queued', 'request', ARGV[5], 'created_at', ARGV[4],
           'attempts', '0', 'stream', KEYS[4], 'keep_embedding', ARGV[8], 'owner', ARGV[9])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[3], 'ttl', ARGV[7]) end
redis.call('ZADD', KEYS[1], seq, ARGV[1])
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[4], ARGV[6], '0', 'MKSTREAM')
redis.call('XADD', KEYS[4], '*', 'job', ARGV[1], 'request', ARGV[5], 'created_at', ARGV[4], 'keep_embedding', ARGV[8],
           'ttl', ARGV[7])
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[3]) end
return {'ok', ARGV[1], depth}
"""

# KEYS: job, queued ; ARGV: job id, worker id, now, ttl (a job's own 'ttl' field wins, here and below), events
#       channel, the 'running' event, the 'cancelled' event
# -> {outcome, fields}: outcome 'running' (go) | 'cancelled' | a terminal status | 'gone' (expired or never existed:
#    skip it); fields: the job's hash as a flat list, read in the same call (one round trip per start)
START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'gone', {}} end
ARGV[4] = redis.call('HGET', KEYS[1], 'ttl') or ARGV[4]
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  return {status, redis.call('HGETALL', KEYS[1])}
end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('RPUSH', KEYS[1] .. ':done', 'cancelled')
  redis.call('EXPIRE', KEYS[1] .. ':done', 300)
  redis.call('PUBLISH', ARGV[5], ARGV[7])
  return {'cancelled', redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'started_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {'running', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: job, stream ; ARGV: job id, status, now, ttl, events channel, the status event, the 'cancelled' event,
#       group, stream entry id, the last progress event ('' for none: announced before the status event, so the
#       worker makes no round trip at the last step), field/value count, field1, value1, ..., image1, image2, ...
# Stores the outcome, announces it, and acknowledges and deletes the stream entry, in one atomic call: a worker that
# dies after it leaves nothing to redeliver. A 'succeeded' outcome of a job whose cancel flag was set meanwhile is
# stored as cancelled, without images.
# -> 1 stored as given | 2 stored as cancelled | 0 already finished (a duplicate run: its result is dropped)
FINISH = """
redis.call('XACK', KEYS[2], ARGV[8], ARGV[9])
redis.call('XDEL', KEYS[2], ARGV[9])
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'queued' then return 0 end
ARGV[4] = redis.call('HGET', KEYS[1], 'ttl') or ARGV[4]
if ARGV[2] == 'succeeded' and redis.call('HGET', KEYS[1], 'cancel') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[3], 'error', 'job cancelled during denoising',
             'error_type', 'cancelled', 'images', '0')
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('RPUSH', KEYS[1] .. ':done', 'cancelled')
  redis.call('EXPIRE', KEYS[1] .. ':done', 300)
  redis.call('PUBLISH', ARGV[5], ARGV[7])
  return 2
end
local nfields = tonumber(ARGV[11])
local args = {'status', ARGV[2], 'finished_at', ARGV[3]}
for i = 1, nfields * 2 do table.insert(args, ARGV[11 + i]) end
local first_image = 12 + nfields * 2
local n = 0
for i = first_image, #ARGV do
  local key = KEYS[1] .. ':image:' .. tostring(n)
  redis.call('SET', key, ARGV[i], 'EX', ARGV[4])
  n = n + 1
end
table.insert(args, 'images'); table.insert(args, tostring(n))
redis.call('HSET', KEYS[1], unpack(args))
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('RPUSH', KEYS[1] .. ':done', ARGV[2])
redis.call('EXPIRE', KEYS[1] .. ':done', 300)
if ARGV[10] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[10]) end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""

# KEYS: job, queued ; ARGV: job id, now, ttl, the cancel channel prefix
# A running job gets its cancel flag, and its worker is told on its cancel channel, so that it stops at the next step
# without reading the flag on every step (it still reads it with each progress report, in case the message is lost).
# -> 'cancelled' (was queued) | 'cancelling' (running: stops at its next step) | terminal status | 'gone'
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'gone' end
ARGV[3] = redis.call('HGET', KEYS[1], 'ttl') or ARGV[3]
if status == 'queued' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2], 'cancel', '1')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('RPUSH', KEYS[1] .. ':done', 'cancelled')
  redis.call('EXPIRE', KEYS[1] .. ':done', 300)
  return 'cancelled'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  local worker = redis.call('HGET', KEYS[1], 'worker')
  if worker then redis.call('PUBLISH', ARGV[4] .. worker, ARGV[1]) end
  return 'cancelling'
end
return status
"""
