"""`registry-mirror check-config --probe`: reach what the configuration names and say what works.

One line per check, `ok` or `FAILED` and the reason in words: each upstream's `/v2/` (through
the same `UpstreamClient` the mirror uses, so TLS settings, CA files and the address guard
apply) and its login, the cache directory (there, writable, free space), and for a cluster
Redis (PING) and the S3 bucket (HeadBucket). Nothing is changed anywhere: no bucket is created,
no directory made, the one file written to the cache directory is removed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mirror.config import Config
from mirror.progress import human
from mirror.upstream.client import UpstreamClient
from mirror.upstream.guard import UpstreamNetwork

TIMEOUT = 10.0  # seconds for Redis and S3 (each upstream has its own connect_timeout)


@dataclass(frozen=True)
class Check:
    what: str  # "upstream default (https://registry-1.docker.io)"
    ok: bool
    words: str

    def line(self) -> str:
        return f"{self.what}: {'ok' if self.ok else 'FAILED'}, {self.words}"


async def probe_upstream(name: str, client: UpstreamClient) -> list[Check]:
    what = f"upstream {name} ({client.base_url})"
    client.open()
    try:
        result = await client.probe()
    finally:
        await client.close()
    checks = [Check(what, result.reached.ok, result.reached.words)]
    if result.login is not None:
        checks.append(Check(f"upstream {name} login", result.login.ok, result.login.words))
    return checks


def check_cache_dir(directory: Path) -> Check:
    """There (or creatable by `serve`), a directory, writable in fact (a file is written and
    removed: `os.access` says yes to root on a read-only mount), and how much room is left."""
    what = f"cache dir {directory}"
    if directory.exists() and not directory.is_dir():
        return Check(what, False, "is a file, not a directory")
    if not directory.exists():
        parent = next((p for p in directory.parents if p.exists()), Path("/"))
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return Check(what, False, f"does not exist, and {parent} is not writable by this user")
        free = shutil.disk_usage(parent).free
        return Check(what, True, f"does not exist yet (serve creates it); {human(free)} free")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as exc:
        return Check(what, False, f"not writable: {exc.strerror or exc}")
    usage = shutil.disk_usage(directory)
    return Check(what, True, f"writable, {human(usage.free)} free of {human(usage.total)}")


def _address(url: str) -> str:
    """A service URL without credentials: scheme://host:port/path."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _words(exc: BaseException) -> str:
    """A client library's own message (they name host, port and reason), not a class name."""
    while exc.__cause__ is not None and not str(exc).strip():
        exc = exc.__cause__
    return str(exc).strip() or "failed"


async def check_redis(url: str) -> Check:
    import redis.asyncio as aioredis  # only for cluster configurations

    what = f"redis {_address(url)}"
    client = aioredis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    try:
        answered = await client.ping()
    except Exception as exc:  # whatever went wrong is the answer
        return Check(what, False, _words(exc))
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    return Check(what, bool(answered), "PING answered" if answered else "PING unanswered")


async def check_s3(config: Config) -> Check:
    from mirror.cache.s3 import open_client  # only for cluster configurations: aiobotocore

    s3 = config.storage.s3
    what = f"s3 bucket {s3.bucket} at {_address(s3.endpoint) if s3.endpoint else 'AWS'}"
    try:
        # Not the store's start(): that would create a missing bucket, and a probe changes nothing.
        async with open_client(
            s3, connect_timeout=TIMEOUT, read_timeout=TIMEOUT, attempts=1
        ) as client:
            await client.head_bucket(Bucket=s3.bucket)
    except Exception as exc:  # whatever went wrong is the answer
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            return Check(what, False, "no such bucket (serve would create it)")
        if status == 403:
            return Check(what, False, "access denied to the bucket with the configured keys")
        return Check(what, False, _words(exc))
    return Check(what, True, "HeadBucket answered")


async def run(config: Config, *, network: UpstreamNetwork | None = None) -> list[Check]:
    """Every check, in a fixed order (upstreams in parallel)."""
    upstreams = {"default": config.upstream, **config.upstreams}
    probes = [
        probe_upstream(name, UpstreamClient(name, upstream, network=network))
        for name, upstream in upstreams.items()
    ]
    checks = [c for found in await asyncio.gather(*probes) for c in found]
    checks.append(await asyncio.to_thread(check_cache_dir, config.cache.dir))
    if config.metadata.kind == "redis":
        checks.append(await check_redis(config.metadata.redis_url))
    if config.storage.kind == "s3":
        checks.append(await check_s3(config))
    return checks


def report(checks: list[Check]) -> tuple[list[str], int]:
    """The lines to print, a summary last, and the exit code: 0 when everything works."""
    failed = sum(not c.ok for c in checks)
    summary = (
        f"all {len(checks)} checks passed" if not failed else f"{failed} of {len(checks)} FAILED"
    )
    return [c.line() for c in checks] + [summary], 1 if failed else 0
