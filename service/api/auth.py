"""API keys, ownership and admission (rate limit, concurrency, daily quota), in one place.

Keys are configured as SHA-256 hashes (`T2I_API_KEYS`, or one per line in `T2I_API_KEYS_FILE`, each optionally
`name:hash`); a client sends `Authorization: Bearer KEY`. A key's owner id is a prefix of its hash: jobs, uploads and
compare runs carry it, and only the same key sees them (another key gets 404, as if they did not exist). With no key
configured the API is open (every caller is `anonymous`), which `check_exposure` allows only on a loopback address
unless `T2I_ALLOW_OPEN=true`.

    t2i keys new            # prints a fresh key and the hash line to put in T2I_API_KEYS
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service import queue
from service.api.queue_client import ANONYMOUS
from service.errors import ConfigError, OverloadedError, UnauthorizedError
from service.settings import Settings


@dataclass(frozen=True)
class Caller:
    owner: str  # who owns what this caller creates
    name: str  # for logs and metrics: the key's configured name, never the key


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    key = "t2i_" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def load_keys(settings: Settings) -> dict[str, str]:
    """hash -> name, from T2I_API_KEYS and T2I_API_KEYS_FILE; a malformed entry stops the API at start."""
    entries = list(settings.api_keys or [])
    if settings.api_keys_file is not None:
        try:
            text = settings.api_keys_file.read_text()
        except OSError as exc:
            raise ConfigError(f"`T2I_API_KEYS_FILE` {str(settings.api_keys_file)!r} cannot be read: {exc.strerror}",
                              field="api_keys_file") from None
        entries += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    keys = {}
    for i, entry in enumerate(entries):
        name, _, digest = entry.rpartition(":")
        digest = digest.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"API key entry {i + 1} is not a SHA-256 hex digest (optionally `name:` before it); "
                              "put the hash of a key there, never the key (`t2i keys new` prints both)",
                              field="api_keys")
        keys[digest] = name or digest[:8]
    return keys


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, keys: dict[str, str], host: str) -> str:
    """Refuse to serve without keys on a non-loopback address unless told to; returns a line saying how it serves."""
    if keys:
        return f"API keys required ({len(keys)} configured)"
    if is_loopback(host) or host.startswith("unix:"):
        return "open: no API keys configured (bound to a loopback address only)"
    if not settings.allow_open:
        raise ConfigError(f"refusing to serve on {host} without API keys: set T2I_API_KEYS (see `t2i keys new`) or, "
                          "to serve openly on purpose, T2I_ALLOW_OPEN=true", field="api_keys")
    return f"OPEN on {host}: no API keys (T2I_ALLOW_OPEN=true)"


async def authenticate(request: Request) -> Caller:
    """The caller of a request: the owner of its key, or anonymous when the API is open. 401 otherwise. Async
    though it awaits nothing: FastAPI runs a plain `def` dependency in a thread pool, a thread hop per request."""
    keys: dict[str, str] = request.app.state.api_keys
    if not keys:
        return Caller(ANONYMOUS, ANONYMOUS)
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise UnauthorizedError("missing API key: send `Authorization: Bearer KEY`", field="authorization")
    digest = hash_key(key.strip())
    for known, name in keys.items():
        if hmac.compare_digest(known, digest):
            return Caller(owner=known[:16], name=name)
    raise UnauthorizedError("unknown API key", field="authorization")


CallerDep = Annotated[Caller, Depends(authenticate)]


# -- admission: rate, concurrency and daily quota per owner -----------------------------------------------------
# KEYS: rate counter, active set, daily counter ; ARGV: jobs, per-minute limit, concurrent limit, cost, daily limit,
#       seconds left in the minute, seconds left in the day, job key prefix
# -> {'ok'} | {'rate', retry} | {'concurrent', retry} | {'quota', retry}
ADMIT = """
local jobs = tonumber(ARGV[1])
if tonumber(ARGV[2]) > 0 then
  local used = tonumber(redis.call('GET', KEYS[1]) or '0')
  if used + jobs > tonumber(ARGV[2]) then return {'rate', ARGV[6]} end
end
if tonumber(ARGV[3]) > 0 then
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local status = redis.call('HGET', ARGV[8] .. id, 'status')
    if not status or status == 'succeeded' or status == 'failed' or status == 'cancelled' then
      redis.call('SREM', KEYS[2], id)
    end
  end
  if redis.call('SCARD', KEYS[2]) + jobs > tonumber(ARGV[3]) then return {'concurrent', '2'} end
end
if tonumber(ARGV[5]) > 0 then
  local spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if spent + tonumber(ARGV[4]) > tonumber(ARGV[5]) then return {'quota', ARGV[7]} end
end
redis.call('INCRBY', KEYS[1], jobs)
redis.call('EXPIRE', KEYS[1], 61)
redis.call('INCRBY', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[3], 86401)
return {'ok'}
"""


async def admit(queue_client, settings: Settings, caller: Caller, *, jobs: int, pixel_steps: int) -> None:
    """Count `jobs` jobs costing `pixel_steps` (width x height x images x steps) against the caller's limits, or
    answer 429 with Retry-After. Call `track` with the job ids once they exist (for the concurrency limit)."""
    if not (settings.rate_jobs_per_minute or settings.max_concurrent_jobs or settings.daily_pixel_steps):
        return
    client = queue_client.client
    now = time.time()
    minute, day = int(now // 60), int(now // 86400)
    kind, *rest = await client.eval(
        ADMIT, 3, queue.rate_key(caller.owner, minute), queue.active_key(caller.owner),
        queue.quota_key(caller.owner, day), jobs, settings.rate_jobs_per_minute, settings.max_concurrent_jobs,
        pixel_steps, settings.daily_pixel_steps, int(60 - now % 60) + 1, int(86400 - now % 86400) + 1,
        f"{queue.PREFIX}:job:")
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind == "ok":
        return
    retry = int(rest[0])
    message = {
        "rate": f"rate limit: more than T2I_RATE_JOBS_PER_MINUTE={settings.rate_jobs_per_minute} jobs this minute",
        "concurrent": f"concurrency limit: T2I_MAX_CONCURRENT_JOBS={settings.max_concurrent_jobs} jobs of this key "
                      "are queued or running",
        "quota": f"daily quota: T2I_DAILY_PIXEL_STEPS={settings.daily_pixel_steps} pixel-steps (width x height x "
                 "images x steps) used up for today (UTC)",
    }[kind]
    raise OverloadedError(message, retry_after=retry, field="quota")


async def track(queue_client, settings: Settings, caller: Caller, job_ids: list[str]) -> None:
    if settings.max_concurrent_jobs and job_ids:
        client = queue_client.client
        await client.sadd(queue.active_key(caller.owner), *job_ids)
        await client.expire(queue.active_key(caller.owner), 7 * 86400)
