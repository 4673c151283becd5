"""The `registry-mirror` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from aiohttp import web

from mirror import __version__, bundle, maintenance, workers
from mirror.config import Config, ConfigError, load_config
from mirror.errors import RegistryError
from mirror.logs import setup_logging
from mirror.progress import Progress, human
from mirror.reference import parse_image
from mirror.warm import warm as warm_images

GIL_SWITCH_INTERVAL = 0.001
if TYPE_CHECKING:  # argparse names no public type for it; generic only to the checker
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _serve_parser(sub: Subcommands) -> None:
    p = sub.add_parser("serve", help="run the mirror")
    p.add_argument("--config", type=Path, help="YAML config file (default: none, built-ins)")
    p.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0:5000)")
    p.add_argument("--cache-dir", help="cache directory")
    p.add_argument("--upstream", help="upstream registry URL (default Docker Hub)")
    p.add_argument(
        "--upstream-username", help="upstream user (or REGISTRY_MIRROR_UPSTREAM_USERNAME)"
    )
    p.add_argument(
        "--upstream-password",
        help="upstream password (prefer REGISTRY_MIRROR_UPSTREAM_PASSWORD or password_file)",
    )
    p.add_argument("--tag-ttl", help="how long a tag is answered without asking upstream")
    p.add_argument("--log-level", help="debug, info, warning or error")
    p.add_argument("--workers", help="worker processes on the port (0: one per core)")
    p.add_argument("--offline", action="store_const", const=True, help="never contact any upstream")
    p.add_argument(workers.WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)


def build_config(args: argparse.Namespace) -> Config:
    return load_config(
        args.config,
        overrides={
            "listen": args.listen,
            "cache.dir": args.cache_dir,
            "upstream.url": args.upstream,
            "upstream.username": args.upstream_username,
            "upstream.password": args.upstream_password,
            "upstream.tag_ttl": args.tag_ttl,
            "log.level": args.log_level,
            "workers": args.workers,
            "offline": args.offline,
        },
    )


def _check_cache_dir(config: Config) -> None:
    directory = config.cache.dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("cache.dir", f"cannot create {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError("cache.dir", f"{directory} is not writable by this user")


def serve(config: Config, argv: list[str], *, reuse_port: bool = False) -> int:
    from mirror.web import tls  # the web layer is only for the serving command
    from mirror.web.app import handler_options, make_app

    _check_cache_dir(config)
    setup_logging(config.log.level, config.log.format)
    count = config.worker_count()
    if count > 1 and not reuse_port:
        return workers.supervise(argv, count, config.cache.dir, config.shutdown_timeout)
    # Let the event loop take the GIL back from worker threads (hashing, SQLite) within 1 ms
    # rather than Python's default 5 ms, which would show up in request latency.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    host, port = config.listen_address()
    app = make_app(config)
    app.on_startup.append(_freeze_heap)
    ssl_context = None
    if config.tls.enabled:
        try:
            ssl_context = tls.make_context(config.tls)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls.cert", f"cannot load the certificate and key: {exc}") from None

    async def _reload_on_sighup(app: web.Application) -> None:
        tls.reload_on_sighup(ssl_context, config.tls)

    app.on_startup.append(_reload_on_sighup)
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        print=None,
        shutdown_timeout=config.shutdown_timeout,
        ssl_context=ssl_context,
        reuse_port=reuse_port,
        **handler_options(config),
    )
    return 0


async def _freeze_heap(app: web.Application) -> None:
    """Keep start-up objects out of the cyclic GC: a full collection over them pauses the
    event loop for tens of milliseconds (seen in benchmarks/index_latency.py)."""
    gc.freeze()


def _cache_parser(sub: Subcommands, name: str, help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument("--cache-dir", help="cache directory (default: from the config)")
    return p


def _cache_config(args: argparse.Namespace) -> Config:
    overrides = {"cache.dir": args.cache_dir, "upstream.url": getattr(args, "upstream", None)}
    return load_config(args.config, overrides=overrides)


async def _warm(config: Config, args: argparse.Namespace) -> int:
    images = list(args.images)
    if args.file is not None:
        try:
            lines = args.file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError("--file", f"cannot read {args.file}: {exc.strerror}") from None
        images += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not images:
        raise ConfigError("warm", "name at least one IMAGE or give -f FILE")
    for image in images:
        parse_image(image)
    platforms = set(args.platform.split(",")) if args.platform else None
    async with maintenance.open_cache(config) as cache:
        await cache.mirror.router.start()
        try:
            summary = await warm_images(
                cache.mirror,
                images,
                platforms=platforms,
                concurrency=max(1, args.concurrency),
                progress=Progress("warm"),
            )
        finally:
            await cache.mirror.router.close()
        if args.pin:
            await maintenance.set_pins(cache, images, pin=True)
    for failure in summary.failures:
        print(f"failed: {failure}", file=sys.stderr)
    print(
        f"warmed {summary.images} images: fetched {summary.fetched_blobs} blobs "
        f"({human(summary.fetched_bytes)}), {summary.present_blobs} already present "
        f"({human(summary.present_bytes)}), {len(summary.failures)} failures"
        + ("; pinned" if args.pin else "")
    )
    return 1 if summary.failures else 0


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


async def _gc(config: Config, dry_run: bool) -> int:
    async with maintenance.open_cache(config) as cache:
        plan, shared = await maintenance.gc(cache, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for digest, entry, reason in plan.victims:
        served = _when(entry.last_served)
        print(f"{verb} {digest} {human(entry.size)} ({reason}, last served {served})")
    budget = human(plan.budget) if plan.budget else "none"
    print(
        f"{verb} {len(plan.victims)} entries, {human(plan.freed)}; "
        f"cache was {human(plan.size_before)}, budget {budget}"
    )
    if shared is not None:
        for digest, size, reason in shared.victims:
            print(f"{verb} {digest} {human(size)} from the shared store ({reason})")
        budget = human(shared.budget) if shared.budget else "none"
        print(
            f"shared store: {verb} {len(shared.victims)} objects, {human(shared.freed)}; "
            f"it held {human(shared.size_before)}, budget {budget}"
        )
    return 0


async def _ls(config: Config) -> int:
    async with maintenance.open_cache(config) as cache:
        rows = await maintenance.list_images(cache)
    print(f"{'REPOSITORY':40} {'TAG':20} {'SIZE':>10}  {'LAST USED':19}  FLAGS")
    for r in rows:
        flags = ",".join(f for f, on in (("pinned", r.pinned), ("partial", not r.complete)) if on)
        print(f"{r.repository:40} {r.tag:20} {human(r.size):>10}  {_when(r.last_used):19}  {flags}")
    return 0


async def _verify(config: Config, repair: bool) -> int:
    async with maintenance.open_cache(config) as cache:
        checked, bad = await maintenance.verify(cache, repair=repair)
    for digest in bad:
        print(f"removed {digest}: its bytes do not match its digest")
    print(f"checked {checked} blobs, {len(bad)} bad" + ("; index rebuilt" if repair else ""))
    return 1 if bad else 0


async def _pins(config: Config, images: list[str], pin: bool) -> int:
    async with maintenance.open_cache(config) as cache:
        pins = await maintenance.set_pins(cache, images, pin=pin)
    for image in sorted(pins | set(config.cache.pins)):
        print(image)
    return 0


async def _export(config: Config, args: argparse.Namespace) -> int:
    for image in args.images:
        parse_image(image)
    async with maintenance.open_cache(config) as cache:
        try:
            size = await bundle.export(cache, args.images, args.output, args.format)
        except bundle.BundleError as exc:
            print(f"registry-mirror: export: {exc}", file=sys.stderr)
            return 1
    print(f"exported {len(args.images)} images ({human(size)}) to {args.output}")
    return 0


async def _import(config: Config, args: argparse.Namespace) -> int:
    async with maintenance.open_cache(config) as cache:
        try:
            plan = await bundle.import_bundle(
                cache, args.bundle, args.repository, Progress("import")
            )
        except bundle.BundleError as exc:
            print(f"registry-mirror: import: {exc}; nothing was imported", file=sys.stderr)
            return 1
    tags = ", ".join(f"{name}:{tag}" for _, name, tag, _, _ in plan.tags) or "no tags"
    print(f"imported {len(plan.blobs)} blobs ({human(sum(plan.blobs.values()))}); {tags}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="registry-mirror", description="Pull-through caching mirror for OCI registries."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    gc = _cache_parser(sub, "gc", "apply the eviction policy now")
    gc.add_argument("--dry-run", action="store_true", help="only list what would go")
    _cache_parser(sub, "ls", "list cached repositories and tags")
    verify = _cache_parser(sub, "verify", "re-hash every blob; remove any that does not match")
    verify.add_argument("--repair", action="store_true", help="also rebuild the index")
    for name, help in (("pin", "never evict these images"), ("unpin", "let them be evicted")):
        p = _cache_parser(sub, name, help)
        p.add_argument("images", nargs="+", metavar="IMAGE", help="repo:tag or repo@digest")
    _cache_parser(sub, "check-config", "validate the configuration and exit")
    w = _cache_parser(sub, "warm", "fetch images into the cache ahead of need")
    w.add_argument("images", nargs="*", metavar="IMAGE", help="repo:tag or repo@digest")
    w.add_argument("-f", "--file", type=Path, help="read images from FILE, one per line")
    w.add_argument("--platform", help="only these platforms of an index: linux/amd64,...")
    w.add_argument("--pin", action="store_true", help="pin what was warmed")
    w.add_argument("--concurrency", type=int, default=4, help="blobs fetched at a time (4)")
    w.add_argument("--upstream", help="upstream registry URL (default: from the config)")
    e = _cache_parser(sub, "export", "write cached images as an OCI image layout")
    e.add_argument("images", nargs="+", metavar="IMAGE", help="repo:tag or repo@digest")
    e.add_argument("-o", "--output", type=Path, required=True, help="the tar (or directory)")
    e.add_argument("--format", choices=("tar", "dir"), default="tar", help="tar (default) or dir")
    i = _cache_parser(sub, "import", "load an OCI image layout (tar or directory) into the cache")
    i.add_argument("bundle", type=Path, metavar="FILE", help="an OCI layout tar or directory")
    i.add_argument("--repository", help="repository for images the layout names by tag only")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(build_config(args), argv, reuse_port=args.reuse_port)
        config = _cache_config(args)
        setup_logging("warning", config.log.format)  # commands print their own results
        if args.command == "check-config":
            _check_cache_dir(config)
            print("configuration OK")
            return 0
        if args.command == "gc":
            return asyncio.run(_gc(config, args.dry_run))
        if args.command == "ls":
            return asyncio.run(_ls(config))
        if args.command == "verify":
            return asyncio.run(_verify(config, args.repair))
        if args.command == "export":
            return asyncio.run(_export(config, args))
        if args.command == "import":
            return asyncio.run(_import(config, args))
        if args.command == "warm":
            return asyncio.run(_warm(config, args))
        if args.command in ("pin", "unpin"):
            return asyncio.run(_pins(config, args.images, args.command == "pin"))
    except ConfigError as exc:
        print(f"registry-mirror: {exc}", file=sys.stderr)
        return 2
    except RegistryError as exc:
        print(f"registry-mirror: {exc.message}: {exc.detail}", file=sys.stderr)
        return 2
    return 1
