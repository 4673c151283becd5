"""The `registry-mirror` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from aiohttp import web

from mirror import __version__
from mirror.config import Config, ConfigError, load_config
from mirror.logs import setup_logging


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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


def serve(config: Config) -> int:
    from mirror.web.app import make_app  # the web layer is only for the serving command

    _check_cache_dir(config)
    setup_logging(config.log.level, config.log.format)
    host, port = config.listen_address()
    web.run_app(make_app(config), host=host, port=port, access_log=None, print=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="registry-mirror", description="Pull-through caching mirror for OCI registries."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
        if args.command == "serve":
            return serve(config)
    except ConfigError as exc:
        print(f"registry-mirror: {exc}", file=sys.stderr)
        return 2
    return 1
