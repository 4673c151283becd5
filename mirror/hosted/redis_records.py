"""`HostedRecords` in Redis, shared by a cluster's nodes (see records.py for the contract).

Keys, under the cluster's prefix and `hosted:`:

    content             hash  digest -> "size created"        hosted content
    bytes               string  total bytes of `content`
    links:<repo>        set   digests `repo` may serve
    linkers:<digest>    set   repositories linking it
    repos               set   repositories ever written (listings skip emptied ones)
    manifests:<repo>    hash  digest -> JSON record
    manifested          hash  digest -> how many repositories hold it as a manifest
    refs:<repo>@<d>     set   what manifest <d> references
    refcount            hash  digest -> how many manifests reference it
    tags:<repo>         hash  tag -> digest
    subject:<repo>@<d>  set   manifests whose subject is <d>
    uploads             hash  id -> JSON {repo, started, touched, offset}

What must be atomic (a manifest's references all linked; gc forgetting only the unreferenced;
an upload's offset moving only from where the caller saw it) is one Lua script each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mirror.cache.redis_store import RedisStore, _unavailable
from mirror.hosted.metadata import ManifestRecord, NewManifest, UploadRecord
from mirror.reference import Digest

# KEYS: links, manifests, refs, refcount, tags, subject, content, manifested, repos, bytes
# ARGV: digest, record, size, now, repo, subject, n required, required..., n children,
#       children..., tags...
_PUT_MANIFEST = """
local digest, record, size, now, repo, subject = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  ARGV[6]
local i = 7
local nreq = tonumber(ARGV[i]); i = i + 1
local missing = {}
for j = 1, nreq do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then table.insert(missing, ARGV[i]) end
  i = i + 1
end
if #missing > 0 then return missing end
local nchild = tonumber(ARGV[i]); i = i + 1
if redis.call('HSET', KEYS[2], digest, record) == 1 then
  redis.call('HINCRBY', KEYS[8], digest, 1)
end
for j = 1, nchild do
  if redis.call('SADD', KEYS[3], ARGV[i]) == 1 then redis.call('HINCRBY', KEYS[4], ARGV[i], 1) end
  i = i + 1
end
while i <= #ARGV do
  redis.call('HSET', KEYS[5], ARGV[i], digest)
  i = i + 1
end
if redis.call('HSETNX', KEYS[7], digest, size .. ' ' .. now) == 1 then
  redis.call('INCRBY', KEYS[10], size)
end
if subject ~= '' then redis.call('SADD', KEYS[6], digest) end
redis.call('SADD', KEYS[9], repo)
return {}
"""
# KEYS: manifests, refs, refcount, tags, manifested, subject; ARGV: digest
_DELETE_MANIFEST = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
for _, child in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HINCRBY', KEYS[3], child, -1) <= 0 then redis.call('HDEL', KEYS[3], child) end
end
redis.call('DEL', KEYS[2])
if redis.call('HINCRBY', KEYS[5], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[5], ARGV[1]) end
local tags = redis.call('HGETALL', KEYS[4])
for j = 1, #tags, 2 do
  if tags[j + 1] == ARGV[1] then redis.call('HDEL', KEYS[4], tags[j]) end
end
redis.call('SREM', KEYS[6], ARGV[1])
return 1
"""
# KEYS: content, refcount, manifested, linkers, bytes; ARGV: digest, cut-off, links prefix
_REMOVE_GARBAGE = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value == false then return 0 end
local size, created = string.match(value, '^(%d+) (.+)$')
if tonumber(created) >= tonumber(ARGV[2]) then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DECRBY', KEYS[5], size)
for _, repo in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('SREM', ARGV[3] .. repo, ARGV[1])
end
redis.call('DEL', KEYS[4])
return 1
"""
# KEYS: content, links, linkers, repos, bytes; ARGV: digest, size, now, repo, add (1/0)
_LINK = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value == false then
  if ARGV[5] ~= '1' then return false end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
  redis.call('INCRBY', KEYS[5], ARGV[2])
  value = ARGV[2] .. ' ' .. ARGV[3]
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
return string.match(value, '^(%d+)')
"""
# KEYS: uploads; ARGV: id, expected, offset, now
_ADVANCE = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value == false then return 0 end
local record = cjson.decode(value)
if tonumber(record['offset']) ~= tonumber(ARGV[2]) then return 0 end
record['offset'] = tonumber(ARGV[3])
record['touched'] = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(record))
return 1
"""


class RedisHostedRecords:
    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.r: Any = store.redis
        self._put_manifest = self.r.register_script(_PUT_MANIFEST)
        self._delete_manifest = self.r.register_script(_DELETE_MANIFEST)
        self._remove_garbage = self.r.register_script(_REMOVE_GARBAGE)
        self._link = self.r.register_script(_LINK)
        self._advance = self.r.register_script(_ADVANCE)

    def k(self, *parts: str) -> str:
        return self.store.key("hosted", *parts)

    @staticmethod
    @contextmanager
    def _io(what: str) -> Iterator[None]:
        with _unavailable(f"hosted {what}"):
            yield

    # -- content and links --------------------------------------------------------------------

    async def content_size(self, digest: str) -> int | None:
        with self._io("content_size"):
            value = await self.r.hget(self.k("content"), digest)
        return None if value is None else int(str(value).split(" ", 1)[0])

    async def _linking(self, repo: str, digest: str, size: int, now: float, add: bool) -> Any:
        keys = [
            self.k("content"), self.k("links", repo), self.k("linkers", digest),
            self.k("repos"), self.k("bytes"),
        ]  # fmt: skip
        with self._io("link"):
            return await self._link(keys=keys, args=[digest, size, now, repo, "1" if add else "0"])

    async def add_blob(self, repo: str, digest: str, size: int, now: float) -> None:
        await self._linking(repo, digest, size, now, True)

    async def link(self, repo: str, digest: str) -> int | None:
        size = await self._linking(repo, digest, 0, 0.0, False)
        return None if size is None else int(size)

    async def linked(self, repo: str, digest: str) -> int | None:
        with self._io("linked"):
            if not await self.r.sismember(self.k("links", repo), digest):
                return None
        return await self.content_size(digest)

    async def repos_linking(self, digest: str) -> list[str]:
        with self._io("repos_linking"):
            return sorted(await self.r.smembers(self.k("linkers", digest)))

    async def unlink(self, repo: str, digest: str) -> bool:
        with self._io("unlink"):
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.srem(self.k("links", repo), digest)
                pipe.srem(self.k("linkers", digest), repo)
                removed, _ = await pipe.execute()
        return bool(removed)

    async def total_size(self) -> int:
        with self._io("total_size"):
            return int(await self.r.get(self.k("bytes")) or 0)

    async def all_content(self) -> set[Digest]:
        with self._io("all_content"):
            return {Digest(d) for d in await self.r.hkeys(self.k("content"))}

    # -- manifests and tags -------------------------------------------------------------------

    async def put_manifest(self, m: NewManifest, now: float) -> list[str]:
        record = json.dumps(
            {
                "media_type": m.media_type,
                "size": m.size,
                "subject": m.subject,
                "descriptor": m.descriptor,
            }
        )
        keys = [
            self.k("links", m.repo), self.k("manifests", m.repo),
            self.k("refs", f"{m.repo}@{m.digest}"), self.k("refcount"), self.k("tags", m.repo),
            self.k("subject", f"{m.repo}@{m.subject or ''}"), self.k("content"),
            self.k("manifested"), self.k("repos"), self.k("bytes"),
        ]  # fmt: skip
        required = list(dict.fromkeys(m.required))
        children = list(dict.fromkeys(m.children))
        args: list[str | int | float] = [m.digest, record, m.size, now, m.repo, m.subject or ""]
        args += [len(required), *required, len(children), *children, *m.tags]
        with self._io("put_manifest"):
            missing = await self._put_manifest(keys=keys, args=args)
        return [str(d) for d in missing]

    async def manifest(self, repo: str, digest: str) -> ManifestRecord | None:
        with self._io("manifest"):
            value = await self.r.hget(self.k("manifests", repo), digest)
        if value is None:
            return None
        record = json.loads(value)
        return ManifestRecord(record["media_type"], int(record["size"]), record["subject"])

    async def tag(self, repo: str, tag: str) -> Digest | None:
        with self._io("tag"):
            value = await self.r.hget(self.k("tags", repo), tag)
        return None if value is None else Digest(value)

    async def delete_manifest(self, repo: str, digest: str) -> bool:
        record = await self.manifest(repo, digest)
        if record is None:
            return False
        keys = [
            self.k("manifests", repo), self.k("refs", f"{repo}@{digest}"), self.k("refcount"),
            self.k("tags", repo), self.k("manifested"),
            self.k("subject", f"{repo}@{record.subject or ''}"),
        ]  # fmt: skip
        with self._io("delete_manifest"):
            return bool(await self._delete_manifest(keys=keys, args=[digest]))

    async def delete_tag(self, repo: str, tag: str) -> bool:
        with self._io("delete_tag"):
            return bool(await self.r.hdel(self.k("tags", repo), tag))

    async def tags(self, repo: str) -> list[str] | None:
        with self._io("tags"):
            found = list(await self.r.hkeys(self.k("tags", repo)))
            if found:
                return found
            exists = await self.r.exists(self.k("manifests", repo), self.k("links", repo))
        return [] if exists else None

    async def repositories(self) -> list[str]:
        with self._io("repositories"):
            repos = sorted(await self.r.smembers(self.k("repos")))
            out = []
            for repo in repos:
                if await self.r.exists(self.k("manifests", repo), self.k("links", repo)):
                    out.append(repo)
        return out

    async def referrers(self, repo: str, subject: str) -> list[str]:
        with self._io("referrers"):
            digests = sorted(await self.r.smembers(self.k("subject", f"{repo}@{subject}")))
            if not digests:
                return []
            values = await self.r.hmget(self.k("manifests", repo), digests)
        out = []
        for value in values:
            if value is not None and json.loads(value).get("descriptor"):
                out.append(str(json.loads(value)["descriptor"]))
        return out

    async def summary(self) -> list[tuple[str, list[str], int]]:
        out = []
        for repo in await self.repositories():
            with self._io("summary"):
                tags = sorted(await self.r.hkeys(self.k("tags", repo)))
                count = int(await self.r.hlen(self.k("manifests", repo)))
            out.append((repo, tags, count))
        return out

    # -- uploads ------------------------------------------------------------------------------

    async def new_upload(self, upload_id: str, repo: str, now: float) -> None:
        record = {"repo": repo, "started": now, "touched": now, "offset": 0}
        with self._io("new_upload"):
            await self.r.hset(self.k("uploads"), upload_id, json.dumps(record))

    async def upload(self, upload_id: str) -> UploadRecord | None:
        with self._io("upload"):
            value = await self.r.hget(self.k("uploads"), upload_id)
        if value is None:
            return None
        r = json.loads(value)
        return UploadRecord(r["repo"], float(r["started"]), float(r["touched"]), int(r["offset"]))

    async def advance_upload(self, upload_id: str, expected: int, offset: int, now: float) -> bool:
        with self._io("advance_upload"):
            moved = await self._advance(
                keys=[self.k("uploads")], args=[upload_id, expected, offset, now]
            )
        return bool(moved)

    async def touch_upload(self, upload_id: str, now: float) -> None:
        record = await self.upload(upload_id)
        if record is not None:
            await self.advance_upload(upload_id, record.offset, record.offset, now)

    async def drop_upload(self, upload_id: str) -> bool:
        with self._io("drop_upload"):
            return bool(await self.r.hdel(self.k("uploads"), upload_id))

    async def upload_ids(self) -> dict[str, float]:
        with self._io("upload_ids"):
            every = await self.r.hgetall(self.k("uploads"))
        return {k: float(json.loads(v)["touched"]) for k, v in every.items()}

    # -- garbage collection -------------------------------------------------------------------

    async def untagged_manifests(self) -> list[tuple[str, str]]:
        kept: set[tuple[str, str]] = set()
        every: list[tuple[str, str]] = []
        children: dict[tuple[str, str], list[str]] = {}
        subjects: dict[tuple[str, str], list[str]] = {}
        with self._io("untagged_manifests"):
            for repo in await self.repositories():
                for digest in (await self.r.hgetall(self.k("tags", repo))).values():
                    kept.add((repo, digest))
                for digest, value in (await self.r.hgetall(self.k("manifests", repo))).items():
                    every.append((repo, digest))
                    refs = await self.r.smembers(self.k("refs", f"{repo}@{digest}"))
                    children[(repo, digest)] = list(refs)
                    subject = json.loads(value).get("subject")
                    if subject:
                        subjects.setdefault((repo, subject), []).append(digest)
        todo = list(kept)
        while todo:
            key = todo.pop()
            for nxt in [*children.get(key, []), *subjects.get(key, [])]:
                if (key[0], nxt) not in kept:
                    kept.add((key[0], nxt))
                    todo.append((key[0], nxt))
        return [key for key in every if key not in kept]

    async def garbage(self, committed_before: float) -> list[tuple[Digest, int]]:
        with self._io("garbage"):
            content = await self.r.hgetall(self.k("content"))
            referenced = set(await self.r.hkeys(self.k("refcount")))
            manifested = set(await self.r.hkeys(self.k("manifested")))
        out = []
        for digest, value in content.items():
            size, created = value.split(" ", 1)
            if float(created) < committed_before and digest not in referenced | manifested:
                out.append((Digest(digest), int(size)))
        return out

    async def remove_garbage(self, digests: list[str], committed_before: float) -> list[str]:
        removed = []
        for digest in digests:
            keys = [
                self.k("content"), self.k("refcount"), self.k("manifested"),
                self.k("linkers", digest), self.k("bytes"),
            ]  # fmt: skip
            with self._io("remove_garbage"):
                done = await self._remove_garbage(
                    keys=keys, args=[digest, committed_before, self.k("links", "")]
                )
            if done:
                removed.append(digest)
        return removed

    def close(self) -> None:
        """The node's `RedisStore` is closed by the cluster, not here."""
