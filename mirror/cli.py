"""The `registry-mirror` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import structlog

from mirror import __version__, workers
from mirror.config import Config, ConfigError, load_config
from mirror.errors import RegistryError
from mirror.logs import setup_logging
from mirror.memory import tune_malloc
from mirror.progress import Progress, human, plural
from mirror.reference import Digest, is_digest, parse_image

GIL_SWITCH_INTERVAL = 0.001
if TYPE_CHECKING:  # argparse names no public type for it; generic only to the checker
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
    from aiohttp import web

    from mirror import maintenance
    from mirror.hosted import gc as hosted_gc
# The commands import what they use when they run: `serve`'s supervisor never loads the web,
# cache or bundle code its workers run, and stays small (issue 20: memory of the service).


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
    # A worker's inherited listening sockets and status pipe (workers.py), from its supervisor.
    p.add_argument(workers.LISTEN_FDS_FLAG, help=argparse.SUPPRESS)
    p.add_argument(workers.STATUS_FD_FLAG, type=int, help=argparse.SUPPRESS)


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


def _not_a_directory(directory: Path) -> None:
    """One clear line when the cache directory, or a directory it would be made in, is a file
    (rather than `[Errno 17] File exists` from mkdir)."""
    for path in (directory, *directory.parents):
        if path.exists():
            if not path.is_dir():
                what = directory if path == directory else f"{directory}: {path}"
                raise ConfigError("cache.dir", f"{what} is a file, not a directory")
            return


def _check_cache_dir(config: Config) -> None:
    directory = config.cache.dir
    _not_a_directory(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("cache.dir", f"cannot create {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError("cache.dir", f"{directory} is not writable by this user")


def serve(
    config: Config,
    argv: list[str],
    *,
    listen_fds: str | None = None,
    status_fd: int | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then 0. This process binds the port (and with several
    workers supervises them), or, given `listen_fds`, is a worker serving its supervisor's
    sockets. A start failure raises StartError (see workers.py)."""
    from mirror.web import tls  # the web layer is only for the serving command

    stop = workers.StopSignals()  # from here on, SIGINT/SIGTERM ask for a clean stop
    # `systemctl reload` (SIGHUP) must never end the mirror, also before the reload handler is
    # in place: the port listens (and clients connect) before the application has started,
    # whose certificate is the one on disk anyway.
    signal.signal(signal.SIGHUP, _reload_while_starting)
    _check_cache_dir(config)
    setup_logging(config.log.level, config.log.format)
    ssl_context = None
    if config.tls.enabled:  # checked before binding, by the supervisor too
        try:
            ssl_context = tls.make_context(config.tls)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls.cert", f"cannot load the certificate and key: {exc}") from None
    if listen_fds is not None:
        sockets = workers.inherited(listen_fds)
    else:
        count = config.worker_count()
        if count > 1:
            lock = workers.instance_lock(*config.listen_address())
            groups = workers.bind_groups(*config.listen_address(), count)
            try:
                return workers.supervise(
                    argv,
                    count,
                    groups,
                    config.cache.dir,
                    config.shutdown_timeout,
                    stop,
                    on_ready=lambda: workers.log_listening(config, groups[0], count),
                )
            finally:
                lock.close()
        sockets = workers.bind(*config.listen_address())
    with workers.starting():
        from aiohttp import web  # a worker (or the one process) serves: the web stack now

        from mirror.web.app import handler_options, make_app

        tune_malloc()  # before the serving process allocates its first blob chunk
        # Let the event loop take the GIL back from worker threads (hashing, SQLite) within 1 ms
        # rather than Python's default 5 ms, which would show up in request latency.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        app = make_app(config)
        app.on_startup.append(_freeze_heap)

        async def _reload_on_sighup(app: web.Application) -> None:
            tls.reload_on_sighup(ssl_context, config.tls)

        app.on_startup.append(_reload_on_sighup)
        runner = web.AppRunner(
            app,
            handle_signals=False,  # workers.run: one clean stop, whatever signals follow
            access_log=None,
            shutdown_timeout=config.shutdown_timeout,
            **handler_options(config),
        )

    def on_ready() -> None:
        if status_fd is None:
            workers.log_listening(config, sockets, 1)
        else:
            workers.report(status_fd, "ready")  # the supervisor logs the instance's line

    workers.run(runner, sockets, ssl_context, stop, on_ready)
    return 0


def _reload_while_starting(_signum: int, _frame: object) -> None:
    structlog.get_logger("mirror.web.tls").info("reload_requested", reloaded=[], starting=True)


def _serve_command(args: argparse.Namespace, argv: list[str]) -> int:
    """`serve`'s exit codes: 0 after a clean stop, 1 when it could not start (one line, see
    workers.py), 2 for an invalid configuration (one line naming the key)."""
    try:
        return serve(build_config(args), argv, listen_fds=args.listen_fds, status_fd=args.status_fd)
    except ConfigError as exc:
        return _start_failed(args, str(exc), 2)
    except RegistryError as exc:
        return _start_failed(args, f"{exc.message}: {exc.detail}", 2)
    except workers.StartError as exc:
        return _start_failed(args, str(exc), workers.EXIT_START_FAILED)


def _start_failed(args: argparse.Namespace, message: str, code: int) -> int:
    message = " ".join(message.splitlines())
    if args.status_fd is not None:  # a worker: its supervisor says it, once for all workers
        workers.report(args.status_fd, "failed", message)
    else:
        print(f"registry-mirror: {message}", file=sys.stderr)
    return code


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
    from mirror import maintenance
    from mirror.warm import warm as warm_images

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
                with_referrers=args.with_referrers,
            )
        finally:
            await cache.mirror.router.close()
        if args.pin:
            await maintenance.set_pins(cache, images, pin=True)
    for failure in summary.failures:
        print(f"failed: {failure}", file=sys.stderr)
    print(summary.describe() + ("; pinned" if args.pin else ""))
    return 1 if summary.failures else 0


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


async def _gc(config: Config, dry_run: bool, delete_untagged: bool = False) -> int:
    from mirror import maintenance
    from mirror.hosted import gc as hosted_gc

    async with maintenance.open_cache(config) as cache:
        plan, shared = await maintenance.gc(cache, dry_run=dry_run)
        hosted = await hosted_gc.collect(
            cache.hosted, dry_run=dry_run, delete_untagged=delete_untagged
        )
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
    if config.hosted.repositories:
        _print_hosted_gc(hosted, verb)
    return 0


def _print_hosted_gc(hosted: hosted_gc.HostedCollection, verb: str) -> None:
    for repo, digest in hosted.manifests:
        print(f"{verb} hosted manifest {repo}@{digest} (untagged)")
    for digest, size in hosted.blobs:
        print(f"{verb} hosted {digest} {human(size)} (no hosted manifest references it)")
    for upload_id in hosted.uploads:
        print(f"{verb} abandoned upload {upload_id}")
    print(
        f"hosted: {verb} {len(hosted.blobs)} blobs, {human(hosted.freed)}; "
        f"{len(hosted.uploads)} abandoned uploads"
    )


async def _ls(config: Config) -> int:
    from mirror import maintenance

    directory = config.cache.dir
    if not directory.is_dir():  # say so, rather than make an empty cache there to list
        print(
            f"registry-mirror: ls: no cache at {directory} (give --cache-dir or --config)",
            file=sys.stderr,
        )
        return 1
    async with maintenance.open_cache(config) as cache:
        rows = await maintenance.list_images(cache)
    if not rows:
        print(f"no images cached in {directory}")
        return 0
    print(f"{'REPOSITORY':40} {'TAG':20} {'SIZE':>10}  {'LAST USED':19}  FLAGS")
    for r in rows:
        flags = ",".join(f for f, on in (("pinned", r.pinned), ("partial", not r.complete)) if on)
        print(f"{r.repository:40} {r.tag:20} {human(r.size):>10}  {_when(r.last_used):19}  {flags}")
    print(f"{plural(len(rows), 'tag')} cached in {directory}", file=sys.stderr)
    return 0


async def _verify(config: Config, repair: bool) -> int:
    from mirror import maintenance

    async with maintenance.open_cache(config) as cache:
        checked, bad = await maintenance.verify(cache, repair=repair)
    for digest in bad:
        print(f"removed {digest}: its bytes do not match its digest")
    print(f"checked {checked} blobs, {len(bad)} bad" + ("; index rebuilt" if repair else ""))
    return 1 if bad else 0


async def _cached(cache: maintenance.CacheHandle, image: str) -> bool:
    """Whether the cache holds `image`'s manifest (by tag or digest)."""
    name, reference = parse_image(image)
    try:
        target = cache.mirror.router.route(name)
    except RegistryError:  # a registry this mirror does not mirror: nothing of it is cached
        return False
    if is_digest(reference):
        digest = Digest(reference)
    else:
        record = await cache.metadata.get_tag((target.upstream.name, target.repository, reference))
        if record is None:
            return False
        digest = record.digest
    return await cache.mirror.cached_manifest(digest) is not None


async def _pins(config: Config, images: list[str], pin: bool) -> int:
    from mirror import maintenance

    async with maintenance.open_cache(config) as cache:
        pins = await maintenance.set_pins(cache, images, pin=pin)
        absent = [image for image in images if pin and not await _cached(cache, image)]
    for image in absent:
        print(
            f"registry-mirror: pin: {image} is not in the cache; pinned all the same, it stays"
            " once pulled (or `registry-mirror warm --pin` it now)",
            file=sys.stderr,
        )
    for image in sorted(pins | set(config.cache.pins)):
        print(image)
    return 0


async def _export(config: Config, args: argparse.Namespace) -> int:
    from mirror import bundle, maintenance

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
    from mirror import bundle, maintenance

    async with maintenance.open_cache(config) as cache:
        try:
            plan = await bundle.import_bundle(
                cache, args.bundle, args.repository, Progress("import")
            )
        except bundle.BundleError as exc:
            print(f"registry-mirror: import: {exc}; nothing was imported", file=sys.stderr)
            return 1
    tags = ", ".join(f"{name}:{tag}" for _, name, tag, _, _ in plan.tags) or "no tags"
    new, old = len(plan.written), len(plan.blobs) - len(plan.written)
    print(
        f"imported {plural(len(plan.blobs), 'blob')} ({human(sum(plan.blobs.values()))}): "
        f"{new} new ({human(sum(plan.written.values()))}), {old} already cached; {tags}"
    )
    return 0


async def _probe(config: Config) -> int:
    from mirror import doctor

    lines, code = doctor.report(await doctor.run(config))
    print("\n".join(lines))
    return code


def _parse(
    parser: argparse.ArgumentParser, sub: Subcommands, argv: list[str]
) -> argparse.Namespace:
    """`parse_args`, except that an unknown option after a command gets that command's usage
    (argparse reports every leftover at the top level, with the top-level usage)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = sub.choices.get(args.command)
        after = (
            args.command in argv
            and extra[0] in argv
            and argv.index(extra[0]) > argv.index(args.command)
        )
        (command if command is not None and after else parser).error(
            f"unrecognized arguments: {' '.join(extra)}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="registry-mirror", description="Pull-through caching mirror for OCI registries."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    gc = _cache_parser(
        sub, "gc", "apply the eviction policy now; collect unreferenced hosted blobs"
    )
    gc.add_argument("--dry-run", action="store_true", help="only list what would go")
    gc.add_argument(
        "--delete-untagged",
        action="store_true",
        help="also delete hosted manifests no tag reaches (and so their blobs)",
    )
    _cache_parser(sub, "ls", "list cached repositories and tags")
    verify = _cache_parser(sub, "verify", "re-hash every blob; remove any that does not match")
    verify.add_argument("--repair", action="store_true", help="also rebuild the index")
    for name, help in (("pin", "never evict these images"), ("unpin", "let them be evicted")):
        p = _cache_parser(sub, name, help)
        p.add_argument("images", nargs="+", metavar="IMAGE", help="repo:tag or repo@digest")
    check = _cache_parser(sub, "check-config", "validate the configuration and exit")
    check.add_argument(
        "--probe",
        action="store_true",
        help="also reach every upstream (and its login), the cache dir, Redis and S3",
    )
    w = _cache_parser(sub, "warm", "fetch images into the cache ahead of need")
    w.add_argument("images", nargs="*", metavar="IMAGE", help="repo:tag or repo@digest")
    w.add_argument("-f", "--file", type=Path, help="read images from FILE, one per line")
    w.add_argument("--platform", help="only these platforms of an index: linux/amd64,...")
    w.add_argument("--pin", action="store_true", help="pin what was warmed")
    w.add_argument(
        "--with-referrers",
        action="store_true",
        help="also each image's signatures, SBOMs and attestations (its referrers)",
    )
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
    args = _parse(parser, sub, argv)
    if args.command == "serve":
        return _serve_command(args, argv)
    try:
        config = _cache_config(args)
        setup_logging("warning", config.log.format)  # commands print their own results
        if args.command == "check-config" and args.probe:
            return asyncio.run(_probe(config))
        if args.command == "check-config":
            _check_cache_dir(config)
            print("configuration OK")
            return 0
        _not_a_directory(config.cache.dir)
        if args.command == "gc":
            return asyncio.run(_gc(config, args.dry_run, args.delete_untagged))
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
