"""One upstream GET per manifest reference per mirror, however many workers (and nodes) ask.

Docker Hub counts every manifest GET against a pull budget, so a cold tag asked of two workers
at once must not cost two. Within a process `SingleFlight` joins the requests; across the
workers of one node a lock file under `<cache>/locks/manifests/` (flock, as blob fills use)
decides which worker fetches, and that worker leaves the answer beside the lock:

    <cache>/locks/manifests/<sha256 of the request>        the lock (held while fetching)
    <cache>/locks/manifests/<sha256 of the request>.json   {at, digest, media_type} or {at, error}

A waiting worker reads the answer once it is newer than its own wait began (the bytes are in
the shared store by then) and re-raises the same error, so a 429 or a 404 is not asked twice.
Across nodes the fetch is claimed through the shared tier (a Redis lease, as for fills); a node
that waited on another asks `recheck` (the shared tag record) before fetching itself. Waiting
is bounded by `patience`: past it a worker fetches on its own rather than hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mirror.cache.locks import FileLocks
from mirror.errors import RegistryError, UpstreamError
from mirror.interfaces import SharedTier
from mirror.reference import SHA256_RE, Digest
from mirror.upstream.client import FetchedManifest

POLL = 0.02  # seconds between looks at another worker's fetch
SWEEP_EVERY = 300.0  # answers older than `patience` are removed this often (by whoever asks)

Load = Callable[[Digest], Awaitable[FetchedManifest | None]]
Recheck = Callable[[float], Awaitable[FetchedManifest | None]]


class ManifestFlight:
    def __init__(
        self,
        directory: Path,
        shared: SharedTier,
        *,
        patience: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.locks = FileLocks(directory)
        self.locks.setup()
        self.directory = directory
        self.shared = shared
        self.patience = patience
        self._clock = clock  # wall time: compared across processes
        self._swept = time.monotonic()

    async def do(
        self,
        key: tuple[str, ...],
        fetch: Callable[[], Awaitable[FetchedManifest]],
        load: Load,
        recheck: Recheck,
        since: float | None = None,
    ) -> FetchedManifest:
        """`fetch()` here, or the answer of the worker (or node) fetching `key` already: any
        answer written after `since` (wall time; default: now), which the caller passes as
        when it looked for the record, so that a worker that let go of the lock between that
        look and this call is not asked again (measured: two GETs of one tag 11 ms apart)."""
        name = Digest("sha256:" + hashlib.sha256("\0".join(key).encode()).hexdigest())
        if time.monotonic() - self._swept > SWEEP_EVERY:
            self._swept = time.monotonic()
            await asyncio.to_thread(self._sweep)
        began = self._clock() if since is None else min(since, self._clock())
        deadline = time.monotonic() + self.patience
        waited = False
        while True:
            fd = await asyncio.to_thread(self.locks.try_acquire, name)
            if fd is None:  # another worker fetches: wait for its answer
                waited = True
                if time.monotonic() > deadline:
                    return await fetch()
                await asyncio.sleep(POLL)
                answer = await self._answer(name, began, load)
                if answer is not None:
                    return answer
                continue
            try:
                answer = await self._answer(name, began, load)
                if answer is not None:
                    return answer
                return await self._fetch_claimed(name, began, waited, deadline, fetch, recheck)
            finally:
                await asyncio.to_thread(self.locks.release, name, fd)

    async def _fetch_claimed(
        self,
        name: Digest,
        began: float,
        waited: bool,
        deadline: float,
        fetch: Callable[[], Awaitable[FetchedManifest]],
        recheck: Recheck,
    ) -> FetchedManifest:
        """Holding this node's lock: claim the fetch for the cluster, then make it."""
        while not await self.shared.claim_fetch(name):
            waited = True
            if time.monotonic() > deadline:
                return await fetch()
            await asyncio.sleep(POLL * 5)
        try:
            if waited and (found := await recheck(began)) is not None:
                await self._write(name, {"digest": found.digest, "media_type": found.media_type})
                return found
            try:
                fetched = await fetch()
            except RegistryError as exc:
                await self._write(name, {"error": _error_json(exc)})
                raise
            await self._write(name, {"digest": fetched.digest, "media_type": fetched.media_type})
            return fetched
        finally:
            await self.shared.release_fetch(name)

    def _path(self, name: Digest) -> Path:
        return self.directory / (name.split(":", 1)[1] + ".json")

    async def _write(self, name: Digest, answer: dict[str, Any]) -> None:
        """The answer for the waiting workers (atomic: a temp file renamed)."""
        path = self._path(name)
        temp = path.with_suffix(f".{os.getpid()}.tmp")
        text = json.dumps({"at": self._clock(), **answer}, default=str)

        def write() -> None:
            with contextlib.suppress(OSError):  # a full disk: the waiters fetch on their own
                temp.write_text(text)
                os.replace(temp, path)

        await asyncio.to_thread(write)

    def _sweep(self) -> None:
        """Forget answers no wait can still need (older than `patience`)."""
        old = time.time() - self.patience - SWEEP_EVERY
        for path in self.directory.glob("*.json"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < old:
                    path.unlink()

    async def _answer(self, name: Digest, began: float, load: Load) -> FetchedManifest | None:
        """The fetching worker's answer, if it came after `began` (raised again if an error)."""
        try:
            answer = json.loads(await asyncio.to_thread(self._path(name).read_text))
        except (OSError, ValueError):
            return None
        if not isinstance(answer, dict) or float(answer.get("at", 0)) < began:
            return None
        if isinstance(error := answer.get("error"), dict):
            raise _error_from(error)
        digest = answer.get("digest")
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            return None
        return await load(Digest(digest))


def _error_json(exc: RegistryError) -> dict[str, Any]:
    detail = exc.detail if isinstance(exc.detail, dict | str | None) else str(exc.detail)
    return {
        "code": exc.code,
        "message": exc.message,
        "detail": detail,
        "status": exc.status,
        "headers": exc.headers,
        "upstream": isinstance(exc, UpstreamError),
    }


def _error_from(error: dict[str, Any]) -> RegistryError:
    code, message = str(error.get("code")), str(error.get("message"))
    headers = {str(k): str(v) for k, v in (error.get("headers") or {}).items()}
    status = int(error.get("status") or 502)
    if error.get("upstream"):
        return UpstreamError(message, error.get("detail"), status=status, code=code,
                             headers=headers)  # fmt: skip
    return RegistryError(code, message, error.get("detail"), status=status, headers=headers)
