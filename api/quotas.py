"""Per-owner quotas: request rate (a token bucket), queued jobs and uploads' total bytes.

Over a quota the answer is a 429 problem with ``Retry-After``. Running jobs are limited by the scheduler
instead (``store.repo.claim_job``): a job past its owner's running quota waits queued, it is not refused.

The rate bucket is per owner (not per key: more keys do not buy more rate). In embedded mode it lives in
this process; with ``REDIS_URL`` set it lives in Redis (one Lua script, atomic), so every API process
behind a load balancer draws from the same bucket. Should Redis not answer, the process's own bucket
stands in: a broker outage must not turn every request into an error.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from pruning_core.settings import Settings
from store import repo

from .problems import Problem

if TYPE_CHECKING:
    import redis

log = logging.getLogger("api.quotas")

# What a count quota (queued jobs, upload bytes) asks a client to wait: the time for some of its jobs
# to start or for it to delete uploads is unknown; this keeps well-behaved retry loops slow.
COUNT_RETRY_AFTER_S = 30
MAX_LOCAL_BUCKETS = 10_000  # owners remembered in-process (least recently seen dropped first)
REDIS_TIMEOUT_S = 0.5


def too_many(detail: str, retry_after_s: float, slug: str, **extra: object) -> Problem:
    return Problem(
        429,
        detail,
        slug=slug,
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
        **extra,
    )


class LocalBuckets:
    """Token buckets in this process: ``take(owner)`` -> seconds to wait (0 when a token was taken)."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate, self.burst = rate_per_s, burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # owner -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, owner: str) -> float:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.pop(owner, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[owner] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > MAX_LOCAL_BUCKETS:
                self._buckets.popitem(last=False)
        return wait


# KEYS[1] the owner's bucket; ARGV: rate per s, burst. Redis's own clock, so API hosts need not agree.
_TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(b[1]) or burst, tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class RedisBuckets:
    """The same bucket in Redis, shared by every API process; falls back to ``LocalBuckets``."""

    def __init__(self, url: str, rate_per_s: float, burst: int) -> None:
        import redis

        self.rate, self.burst = rate_per_s, burst
        self.client: redis.Redis = redis.Redis.from_url(
            url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
        )
        self.script = self.client.register_script(_TAKE_LUA)
        self.fallback = LocalBuckets(rate_per_s, burst)

    def take(self, owner: str) -> float:
        try:
            return float(self.script(keys=[f"pruning:rate:{owner}"], args=[self.rate, self.burst]))
        except Exception as err:  # Redis down: this process's own bucket, rather than no limit at all
            log.warning("rate limit: Redis unavailable (%s); using the in-process bucket", type(err).__name__)
            return self.fallback.take(owner)

    def close(self) -> None:
        self.client.close()


class RateLimiter:
    """The request-rate quota; ``rate_per_s`` 0 turns it off."""

    def __init__(self, settings: Settings) -> None:
        self.rate, self.burst = settings.rate_per_s, settings.rate_burst
        self.buckets: LocalBuckets | RedisBuckets | None = None
        if self.rate > 0:
            self.buckets = (
                RedisBuckets(settings.redis_url, self.rate, self.burst)
                if settings.redis_url
                else LocalBuckets(self.rate, self.burst)
            )

    def check(self, owner: str) -> None:
        """Take one token of ``owner``'s bucket, or raise a 429 saying when the next one is there."""
        if self.buckets is None:
            return
        wait = self.buckets.take(owner)
        if wait > 0:
            raise too_many(
                f"Too many requests: at most {self.rate:g}/s (bursts of {self.burst}) per owner.",
                wait,
                "rate-limited",
            )

    def close(self) -> None:
        if isinstance(self.buckets, RedisBuckets):
            self.buckets.close()


def check_queued_jobs(s: Session, owner: str, settings: Settings) -> None:
    """429 when ``owner`` already has ``quota_queued_jobs`` jobs waiting."""
    limit = settings.quota_queued_jobs
    if limit and repo.count_jobs(s, owner, "queued") >= limit:
        raise too_many(
            f"You have {limit} queued jobs, the most allowed; wait for some to start or cancel some.",
            COUNT_RETRY_AFTER_S,
            "queued-jobs-quota",
            limit=limit,
        )


def upload_room(s: Session, owner: str, settings: Settings) -> int | None:
    """Bytes ``owner`` may still upload under ``quota_upload_bytes`` (0 when spent); None: no quota."""
    limit = settings.quota_upload_bytes
    return max(0, limit - repo.upload_bytes(s, owner)) if limit else None


def check_upload_bytes(s: Session, owner: str, incoming: int, settings: Settings) -> None:
    """429 when ``incoming`` more bytes would take ``owner``'s uploads past ``quota_upload_bytes``."""
    limit = settings.quota_upload_bytes
    if not limit:
        return
    used = repo.upload_bytes(s, owner)
    if used + incoming > limit:
        raise too_many(
            f"Your uploads would total {used + incoming} bytes; the quota is {limit}. "
            "Delete some (DELETE /v1/uploads/{id}) first.",
            COUNT_RETRY_AFTER_S,
            "upload-quota",
            limit=limit,
            used=used,
        )
