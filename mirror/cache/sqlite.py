"""Every SQLite (diskcache) call of this process runs on a few dedicated threads.

diskcache opens one SQLite connection per thread per store, and each connection keeps the
database, its `-wal` and its `-shm` open for as long as the thread lives. Called from the
64-thread I/O pool (mirror/web/app.py), the stores (the index's two, the metadata's one) held up
to 64 x 3 connections per worker, about nine hundred descriptors, gained a few at a time under
load and never given back. Here at most `THREADS` x stores connections exist, whoever calls:
the stores run their SQLite work through `run` (async) or `call` (blocking, from any thread),
and their blocking methods are wrapped in `blocking`. SQLite lets one writer in at a time
anyway, so a few threads cost hits nothing; file reads and hashing keep the I/O pool.

    await sqlite.run(index.get, digest)   # from the event loop
    entry = index.get(digest)             # from any thread: hops to a SQLite thread

A call made on one of these threads runs directly, so a store method may call another.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

THREADS = 4  # SQLite connections per store per process (each: 3 descriptors)

_local = threading.local()


def _mark() -> None:
    _local.sqlite = True


_pool = ThreadPoolExecutor(THREADS, thread_name_prefix="mirror-sqlite", initializer=_mark)


def on_sqlite_thread() -> bool:
    """Whether the caller is one of the SQLite threads."""
    return bool(getattr(_local, "sqlite", False))


async def run(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` on a SQLite thread, awaited (as `asyncio.to_thread`)."""
    context = contextvars.copy_context()
    call_in_context = functools.partial(context.run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool, call_in_context)


def call(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` on a SQLite thread, blocking the caller until it is done."""
    if on_sqlite_thread():
        return fn(*args, **kwargs)
    try:
        future = _pool.submit(fn, *args, **kwargs)
    except RuntimeError:  # the interpreter is exiting (no new threads): a last close
        return fn(*args, **kwargs)
    return future.result()


def blocking(fn: Callable[P, T]) -> Callable[P, T]:
    """A blocking store method that always runs on a SQLite thread, whoever calls it."""

    @functools.wraps(fn)
    def on_sqlite(*args: P.args, **kwargs: P.kwargs) -> T:
        return call(fn, *args, **kwargs)

    return on_sqlite
