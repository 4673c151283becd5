"""Redis for a cluster of mirror nodes: fill leases, a leader lease, shared metadata and the
shared LRU/TTL index of the object store.

Every key lives under one prefix, so several mirrors (or test runs) can share a server. Anything
that changes several keys at once, or must check before it writes (a lease still ours, an entry
not yet counted), is one Lua script: atomic on the server and one round trip. Every failure to
reach Redis surfaces as `RedisUnavailable`, within about twice the timeout (one retry on a fresh
connection, for pooled connections a server restart left dead), so callers can degrade to local
operation instead of hanging.

Tag records and privacy are read from Redis every time (another node may have refreshed them);
only values that never change once written (media types) or only grow (origins) are remembered
in memory, and only to save a round trip or a redundant write. Needs Redis 6.2 or later
(ZADD GT, ZRANGE BYSCORE).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import redis
import redis.asyncio as aioredis
from cachetools import LRUCache
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as SyncRetry

from mirror.cache.index import Entry
from mirror.cache.metadata import Origins, Privacy, RepoKey, TagKey, TagRecord, is_tag
from mirror.interfaces import Unavailable
from mirror.reference import Digest

TOUCH_CHUNK = 1000  # last-served times per ZADD
PUBLIC = ""  # member of an origin set meaning "some public repository" (no repo name is empty)
_ERRORS = (redis.RedisError, OSError, asyncio.TimeoutError)


class RedisUnavailable(Unavailable):
    """Redis cannot be reached or failed (connection refused, timeout): callers degrade to
    local operation."""


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """Turn any client error into `RedisUnavailable` (callers need one thing to catch)."""
    try:
        yield
    except _ERRORS as exc:
        raise RedisUnavailable(f"redis {what}: {type(exc).__name__}: {exc}") from exc


# Lease scripts. KEYS[1] = lease key; ARGV[1] = owner; ARGV[2] = lease in ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif holder == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Index scripts. KEYS = entries hash, served zset, totals hash.
# An entry's hash value is "size kind stored_at"; its last_served is its score in the zset.
_ADD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  redis.call('HINCRBY', KEYS[3], 'bytes', ARGV[2])
  redis.call('HINCRBY', KEYS[3], 'entries', 1)
  return 1
end
redis.call('ZADD', KEYS[2], 'XX', 'GT', ARGV[4], ARGV[1])
return 0
"""
_REMOVE = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value == false then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'bytes', '-' .. string.match(value, '^%d+'))
redis.call('HINCRBY', KEYS[3], 'entries', -1)
return 1
"""
# KEYS = entries hash, served zset; ARGV = max score (ZRANGE syntax), limit.
_LEAST_RECENT = """
local served = redis.call('ZRANGE', KEYS[2], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2],
                          'WITHSCORES')
local out = {}
for i = 1, #served, 2 do
  local value = redis.call('HGET', KEYS[1], served[i])
  if value ~= false then
    table.insert(out, served[i])
    table.insert(out, value)
    table.insert(out, served[i + 1])
  end
end
return out
"""

# Serving marks: a zset per digest, member = node, score = expiry in the server's ms clock
# (one clock for every node, so skew between nodes cannot keep a mark alive or end it early).
_MARK_SERVING = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
"""
_SERVING = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore:
    """One connection pool per node; every key under `prefix`."""

    def __init__(
        self,
        url: str,
        prefix: str = "registry-mirror:",
        *,
        timeout: float = 2.0,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        # A blocking pool: a burst of requests waits (up to `timeout`) for a connection instead
        # of failing, and one node never opens more than `max_connections`.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One retry, on connection errors only: a pooled connection that a server restart
            # killed is replaced at once; a timeout is not repeated (bounded, never doubled writes).
            retry=AsyncRetry(ExponentialBackoff(cap=0.1, base=0.01), 1, (redis.ConnectionError,)),
        )
        self.redis: aioredis.Redis = aioredis.Redis.from_pool(pool)
        r = self.redis
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)
        self._lead = r.register_script(_LEAD)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def sync_client(self) -> redis.Redis:
        """A blocking client with the same settings, for callers in worker threads."""
        return redis.Redis.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=SyncRetry(ExponentialBackoff(cap=0.1, base=0.01), 1, (redis.ConnectionError,)),
        )

    async def start(self) -> None:
        """Connect and PING, so a node learns at start-up that Redis is missing."""
        with _unavailable("start"):
            await self.redis.ping()

    async def close(self) -> None:
        with contextlib.suppress(*_ERRORS):
            await self.redis.aclose()

    async def ping(self) -> bool:
        """Whether Redis answers now (for readiness; never raises)."""
        try:
            return bool(await self.redis.ping())
        except Exception:  # a readiness probe answers "no", whatever went wrong
            return False

    # -- fill locks --------------------------------------------------------------------------

    async def acquire_fill(self, digest: str, owner: str, lease: float) -> bool:
        """Take the fill lock for `digest` unless someone holds it; it frees itself after
        `lease` seconds unless renewed (a dead owner cannot block the digest)."""
        with _unavailable("acquire_fill"):
            return bool(
                await self.redis.set(self.key("fill", digest), owner, nx=True, px=_ms(lease))
            )

    async def renew_fill(self, digest: str, owner: str, lease: float) -> bool:
        """Extend our lease; False if it expired or someone else holds it now (then stop)."""
        with _unavailable("renew_fill"):
            key = self.key("fill", digest)
            return bool(await self._renew(keys=[key], args=[owner, _ms(lease)]))

    async def release_fill(self, digest: str, owner: str) -> None:
        """Drop the lock if still ours (never another owner's, taken after ours expired)."""
        with _unavailable("release_fill"):
            await self._release(keys=[self.key("fill", digest)], args=[owner])

    async def fill_owner(self, digest: str) -> str | None:
        with _unavailable("fill_owner"):
            owner = await self.redis.get(self.key("fill", digest))
        return None if owner is None else _text(owner)

    # -- leader ------------------------------------------------------------------------------

    async def try_lead(self, name: str, owner: str, lease: float) -> bool:
        """Become or stay the leader for `name` (e.g. the eviction pass) for `lease` seconds."""
        with _unavailable("try_lead"):
            key = self.key("lead", name)
            return bool(await self._lead(keys=[key], args=[owner, _ms(lease)]))


def _text(value: bytes | str) -> str:
    """A reply as text (the clients decode replies; redis-py's types cannot say so)."""
    return value.decode() if isinstance(value, bytes) else value


def _texts(values: set[bytes] | set[str] | set[bytes | str]) -> set[str]:
    return {_text(v) for v in values}


def _field(*parts: str) -> str:
    """A hash field for a tuple key: JSON, so no character in a name can make it ambiguous."""
    return json.dumps(parts, separators=(",", ":"))


def _tag(field: str, value: str) -> tuple[TagKey, TagRecord]:
    upstream, repository, tag = json.loads(field)
    digest, media_type, fetched_at = json.loads(value)
    return (upstream, repository, tag), TagRecord(Digest(digest), media_type, float(fetched_at))


def _origins(members: set[str]) -> Origins | None:
    if not members:
        return None
    return Origins(PUBLIC in members, frozenset(members - {PUBLIC}))


class RedisMetadataStore:
    """The `MetadataStore` (mirror/interfaces.py) shared by every node through Redis; every
    method that reaches Redis raises `RedisUnavailable` when it is down."""

    def __init__(self, store: RedisStore, memory_entries: int = 100_000) -> None:
        self.store = store
        self._r = store.redis
        self._tags = store.key("tags")
        self._types = store.key("types")
        self._privacy_key = store.key("privacy")
        self._sync: redis.Redis | None = None
        self._media: LRUCache[Digest, str] = LRUCache(memory_entries)
        self._origins: LRUCache[Digest, Origins] = LRUCache(memory_entries)
        self._privacy: LRUCache[RepoKey, Privacy] = LRUCache(10_000)

    def _origin_key(self, digest: Digest) -> str:
        return self.store.key("origin", digest)

    async def get_tag(self, key: TagKey) -> TagRecord | None:
        """Read every time: another node may have revalidated the tag since."""
        field = _field(*key)
        with _unavailable("get_tag"):
            raw = await self._r.hget(self._tags, field)
        return None if raw is None else _tag(field, _text(raw))[1]

    async def put_tag(self, key: TagKey, record: TagRecord) -> None:
        value = json.dumps([record.digest, record.media_type, record.fetched_at])
        with _unavailable("put_tag"):
            await self._r.hset(self._tags, _field(*key), value)

    async def delete_tag(self, key: TagKey) -> None:
        """Forget a tag for every node (its image was evicted); absent: no-op."""
        with _unavailable("delete_tag"):
            await self._r.hdel(self._tags, _field(*key))

    async def get_media_type(self, digest: Digest) -> str | None:
        media_type = self._media.get(digest)
        if media_type is None:
            with _unavailable("get_media_type"):
                raw = await self._r.hget(self._types, digest)
            if raw is None:
                return None
            media_type = self._media[digest] = _text(raw)
        return media_type

    async def put_media_type(self, digest: Digest, media_type: str) -> None:
        """Written even when memory already has it (only upstream fetches call this): a Redis
        that lost its data gets it back."""
        with _unavailable("put_media_type"):
            await self._r.hset(self._types, digest, media_type)
        self._media[digest] = media_type

    async def get_origins(self, digest: Digest) -> Origins | None:
        """Read every time: another node may have learnt of a repository since."""
        with _unavailable("get_origins"):
            members = await self._r.smembers(self._origin_key(digest))
        origins = _origins(_texts(members))
        if origins is None:
            self._origins.pop(digest, None)  # Redis lost it (restart): add_origin must write
        else:
            self._origins[digest] = origins
        return origins

    async def add_origin(self, digests: list[Digest], repo: str | None) -> None:
        """Record that `repo` (None: a public repository) holds each of `digests`. SADD makes
        concurrent additions from several nodes merge; origins only grow, so what this node
        already saw recorded needs no write."""
        member = PUBLIC if repo is None else repo
        todo = [d for d in digests if (o := self._origins.get(d)) is None or o.add(repo) is not o]
        if not todo:
            return
        with _unavailable("add_origin"):
            async with self._r.pipeline(transaction=True) as pipe:
                for digest in todo:
                    pipe.sadd(self._origin_key(digest), member)
                await pipe.execute()
        for digest in todo:
            self._origins[digest] = self._origins.get(digest, Origins()).add(repo)

    async def get_privacy(self, key: RepoKey) -> Privacy | None:
        """Read every time (another node may have checked since); remembered for
        `cached_privacy`."""
        with _unavailable("get_privacy"):
            raw = await self._r.hget(self._privacy_key, _field(*key))
        if raw is None:
            return None
        private, checked_at = json.loads(raw)
        privacy = self._privacy[key] = Privacy(bool(private), float(checked_at))
        return privacy

    async def put_privacy(self, key: RepoKey, privacy: Privacy) -> None:
        self._privacy[key] = privacy
        value = json.dumps([privacy.private, privacy.checked_at])
        with _unavailable("put_privacy"):
            await self._r.hset(self._privacy_key, _field(*key), value)

    def cached_privacy(self, key: RepoKey) -> Privacy | None:
        """What this node last read or wrote (no I/O; for listings)."""
        return self._privacy.get(key)

    async def all_tags(self) -> list[tuple[TagKey, TagRecord]]:
        """Every tag record (HSCAN: Redis is never blocked for the whole hash; a field it
        returns twice, as a scan may while the hash grows, is listed once)."""
        with _unavailable("all_tags"):
            found = {f: v async for f, v in self._r.hscan_iter(self._tags, count=1000)}
        return [t for t in (_tag(f, v) for f, v in found.items()) if is_tag(t[0][2])]

    # -- blocking (worker threads) -----------------------------------------------------------

    def _client(self) -> redis.Redis:
        if self._sync is None:
            self._sync = self.store.sync_client()
        return self._sync

    def is_manifest(self, digest: Digest) -> bool:
        """Whether `digest` was stored as a manifest (blocking; for index rebuilds)."""
        with _unavailable("is_manifest"):
            return bool(self._client().hexists(self._types, digest))

    def iter_tags(self) -> Iterator[tuple[TagKey, TagRecord]]:
        """Every tag record (blocking; for `ls`), each once, as `all_tags`."""
        seen: set[str] = set()
        with _unavailable("iter_tags"):
            for field, value in self._client().hscan_iter(self._tags, count=1000):
                if field not in seen:
                    seen.add(field)
                    key, record = _tag(field, value)
                    if is_tag(key[2]):
                        yield key, record

    def close(self) -> None:
        """Close the blocking client (the shared `RedisStore` is closed by its owner)."""
        if self._sync is not None:
            with contextlib.suppress(*_ERRORS):
                self._sync.close()
            self._sync = None


class RedisIndex:
    """The shared LRU/TTL index and pins for the shared object store (an `Index`; every
    method raises `RedisUnavailable` when Redis is down).

    Entries in a hash (size, kind, stored_at), last-served times as scores of a sorted set
    (least_recent is O(log n + limit)), totals in a hash kept by the same scripts that add and
    remove entries, so they stay exact whatever the nodes do concurrently.
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        r = self._r = store.redis
        self._entries = store.key("idx", "entries")
        self._served = store.key("idx", "served")
        self._totals = store.key("idx", "totals")
        self._pins = store.key("idx", "pins")
        self._keys = [self._entries, self._served, self._totals]
        self._add = r.register_script(_ADD)
        self._remove = r.register_script(_REMOVE)
        self._least_recent = r.register_script(_LEAST_RECENT)
        self._mark = r.register_script(_MARK_SERVING)
        self._serving = r.register_script(_SERVING)

    async def add(self, digest: str, size: int, kind: str, now: float) -> None:
        """A newly stored object; adding one already there counts once (its last-served time
        only moves forward)."""
        with _unavailable("index add"):
            await self._add(keys=self._keys, args=[digest, int(size), kind, repr(float(now))])

    async def touch(self, served: dict[str, float]) -> None:
        """Last-served times for a batch (XX: unknown digests ignored; GT: never backwards),
        in chunks so one large flush never holds Redis for long."""
        items = list(served.items())
        if not items:
            return
        with _unavailable("index touch"):
            async with self._r.pipeline(transaction=False) as pipe:
                for start in range(0, len(items), TOUCH_CHUNK):
                    chunk = dict(items[start : start + TOUCH_CHUNK])
                    pipe.zadd(self._served, chunk, xx=True, gt=True)
                await pipe.execute()

    async def remove(self, digest: str) -> bool:
        with _unavailable("index remove"):
            return bool(await self._remove(keys=self._keys, args=[digest]))

    async def get(self, digest: str) -> tuple[int, str, float, float] | None:
        """(size, kind, stored_at, last_served), or None."""
        with _unavailable("index get"):
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hget(self._entries, digest)
                pipe.zscore(self._served, digest)
                value, last_served = await pipe.execute()
        if value is None or last_served is None:
            return None
        size, kind, stored_at = value.split(" ")
        return int(size), kind, float(stored_at), float(last_served)

    async def totals(self) -> tuple[int, int]:
        """(bytes, entries), exact and O(1)."""
        with _unavailable("index totals"):
            size, count = await self._r.hmget(self._totals, ["bytes", "entries"])
        return int(size or 0), int(count or 0)

    async def least_recent(
        self, limit: int, before: float | None = None
    ) -> list[tuple[str, int, str, float]]:
        """Up to `limit` entries, least recently served first, optionally only those last
        served before `before`: (digest, size, kind, last_served)."""
        if limit <= 0:
            return []
        high = "+inf" if before is None else f"({float(before)!r}"
        with _unavailable("index least_recent"):
            flat: list[Any] = await self._least_recent(keys=self._keys[:2], args=[high, limit])
        out = []
        for i in range(0, len(flat), 3):
            size, kind, _ = flat[i + 1].split(" ")
            out.append((flat[i], int(size), kind, float(flat[i + 2])))
        return out

    # -- the `Index` protocol (mirror/interfaces.py), over the native methods ----------------

    async def note_stored(self, digest: Digest, size: int, kind: str, now: float) -> None:
        await self.add(digest, size, kind, now)

    async def note_served(self, served: Mapping[Digest, float]) -> None:
        times: dict[str, float] = {digest: when for digest, when in served.items()}
        await self.touch(times)

    async def entry(self, digest: Digest) -> Entry | None:
        found = await self.get(digest)
        return None if found is None else Entry(*found)

    async def usage(self) -> tuple[int, int]:
        return await self.totals()

    async def drop(self, digest: Digest) -> bool:
        return await self.remove(digest)

    # -- pins --------------------------------------------------------------------------------

    async def pins(self) -> set[str]:
        with _unavailable("pins"):
            return _texts(await self._r.smembers(self._pins))

    async def pin(self, ref: str) -> None:
        with _unavailable("pin"):
            await self._r.sadd(self._pins, ref)

    async def unpin(self, ref: str) -> bool:
        with _unavailable("unpin"):
            return bool(await self._r.srem(self._pins, ref))

    # -- serving marks -----------------------------------------------------------------------

    async def mark_serving(self, digest: str, node: str, ttl: float) -> None:
        """`node` is streaming `digest` from the shared store: eviction must wait. The mark
        lapses after `ttl` seconds unless marked again, so a dead node holds nothing for long.
        One mark per (digest, node): a node serving a digest to several clients at once
        should count its streams itself (or pass a distinct `node` per stream)."""
        with _unavailable("mark_serving"):
            await self._mark(keys=[self.store.key("serving", digest)], args=[node, _ms(ttl)])

    async def done_serving(self, digest: str, node: str) -> None:
        with _unavailable("done_serving"):
            await self._r.zrem(self.store.key("serving", digest), node)

    async def serving(self, digest: str) -> bool:
        """Whether any node's mark on `digest` is still live."""
        with _unavailable("serving"):
            return bool(await self._serving(keys=[self.store.key("serving", digest)]))
