"""Configuration: frozen dataclasses filled from YAML, then environment, then command-line flags.

Every option has a default here and a line in `conf/mirror.yaml`. A bad value stops start-up with
one line naming the key and what it expects (`ConfigError`), never a traceback.

`load_config` works in steps, each in one place:
1. shape: the file, the `REGISTRY_MIRROR_*` variables and the dotted overrides, each value parsed
   by its field's `Kind` as it arrives (so an error names the key, or the variable, it came from);
   every step returns new frozen objects (`dataclasses.replace`), nothing is assigned in place;
2. secrets: `*_file` / `*_env` indirections replaced by what they name (`resolve_secrets`);
3. meaning: cross-field checks that only read (`validate`);
4. packages: a cluster option whose package is not installed (`require_extras`).
After it returns, the config cannot change: a component that needs another value is given another
config (`dataclasses.replace`), so no one sees an option change under them.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import yaml

from mirror.errors import RegistryError
from mirror.reference import parse_image

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Section = TypeVar("_Section", bound="DataclassInstance")

ENV_PREFIX = "REGISTRY_MIRROR_"
DOCKER_HUB_URL = "https://registry-1.docker.io"
DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "docker.io", "index.docker.io"})
CLUSTER_EXTRA = "pip install 'registry-mirror[cluster]'"

_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_IUNITS = {"ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", re.IGNORECASE)
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

# The choices, as types: mypy then rejects a comparison with a value that cannot occur.
LibraryPrefix = Literal["auto", "true", "false"]
Action = Literal["allow", "deny"]
RuleVerb = Literal["pull", "push", "delete"]
RULE_VERBS: tuple[RuleVerb, ...] = ("pull", "push", "delete")
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
StorageKind = Literal["filesystem", "s3"]
MetadataKind = Literal["local", "redis"]


class ConfigError(ValueError):
    """An invalid option: `str()` is the one line an operator sees."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error: {key}: {message}")
        self.key = key


def parse_size(value: object) -> int:
    """`4MiB`, `50GiB`, `10G`, `1024` (bytes) -> bytes."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    match = _SIZE_RE.fullmatch(str(value))
    if not match:
        raise ValueError
    unit = (match.group(2) or "").lower()
    return int(float(match.group(1)) * (_IUNITS.get(unit) or _UNITS[unit]))


def parse_duration(value: object) -> float:
    """`10m`, `30d`, `1h30m`, `500ms`, or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    if not text or _DURATION_RE.sub("", text):
        raise ValueError
    return sum(float(n) * _SECONDS[u] for n, u in _DURATION_RE.findall(text))


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError


def _parse_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError
    return int(str(value))


def _parse_float(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(str(value))


def _parse_str(value: object) -> str:
    if isinstance(value, dict | list):
        raise ValueError
    return str(value)


def _parse_fraction(value: object) -> float:
    number = float(str(value))
    if not 0 < number <= 1:
        raise ValueError
    return number


def _parse_budget(value: object) -> str:
    """`50GiB`, `0` (no limit) or `80%` (of the cache's file system), kept as written."""
    text = str(value).strip()
    if text.endswith("%"):
        if not 0 < float(text[:-1]) <= 100:
            raise ValueError
    else:
        parse_size(text)
    return text


def _parse_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError


def _yaml_text(value: object) -> object:
    """Structured options may come from the environment as YAML (or JSON) text."""
    if isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError from None
    return value


def _parse_groups(value: object) -> Mapping[str, tuple[str, ...]]:
    value = _yaml_text(value) or {}
    if not isinstance(value, Mapping):
        raise ValueError
    return MappingProxyType({str(k): _parse_list(v) for k, v in value.items()})


@dataclass(frozen=True)
class AccessRule:
    who: tuple[str, ...]
    repositories: tuple[str, ...]
    action: Action
    # What the rule is about: pull (default), push, delete (hosted repositories).
    actions: tuple[RuleVerb, ...] = ("pull",)


def _parse_verbs(value: object) -> tuple[RuleVerb, ...]:
    verbs = _parse_list(value)
    if not verbs or any(v not in RULE_VERBS for v in verbs):
        raise ValueError
    return tuple(v for v in RULE_VERBS if v in verbs)


def _parse_rules(value: object) -> tuple[AccessRule, ...]:
    value = _yaml_text(value) or []
    if not isinstance(value, list):
        raise ValueError
    rules = []
    for item in value:
        if not isinstance(item, Mapping) or set(item) - {
            "who", "repositories", "action", "actions"
        }:  # fmt: skip
            raise ValueError
        action = _parse_action(item.get("action", "allow"))
        verbs = _parse_verbs(item.get("actions", ["pull"]))
        who = _parse_list(item.get("who", ["*"]))
        repositories = _parse_list(item.get("repositories", ["*"]))
        if not who or not repositories:
            raise ValueError
        rules.append(AccessRule(who, repositories, action, verbs))
    return tuple(rules)


def _parse_rate(value: object) -> int:
    """`50MB/s`, `400Mbit/s`, `10MiB` (per second) or bytes per second -> bytes per second."""
    text = str(value).strip()
    text = text[:-2] if text.lower().endswith("/s") else text
    if text.lower().endswith("bit"):
        return parse_size(text[:-3]) // 8
    return parse_size(text)


@dataclass(frozen=True)
class Credential:
    """One upstream account of a pool; `password` is the resolved one after `load_config`."""

    username: str
    password: str | None = field(default=None, repr=False)
    password_file: Path | None = None
    password_env: str | None = None


def _parse_credentials(value: object) -> tuple[Credential, ...]:
    value = _yaml_text(value) or []
    if not isinstance(value, list):
        raise ValueError
    accounts = []
    for item in value:
        if not isinstance(item, Mapping) or set(item) - {
            "username", "password", "password_file", "password_env"
        }:  # fmt: skip
            raise ValueError
        if not isinstance(item.get("username"), str) or not item["username"]:
            raise ValueError
        file = item.get("password_file")
        env, password = item.get("password_env"), item.get("password")
        accounts.append(
            Credential(
                item["username"],
                None if password is None else _parse_str(password),
                None if file is None else Path(_parse_str(file)).expanduser(),
                None if env is None else _parse_str(env),
            )
        )
    return tuple(accounts)


@dataclass(frozen=True)
class VerifyRule:
    """Verify cosign signatures of tags in `repositories` (globs over `<upstream>/<repo>`)
    against `keys` (PEM text or files); `mode` enforce (refuse) or warn (serve, log)."""

    repositories: tuple[str, ...]
    keys: tuple[str, ...]
    mode: str


def _parse_verify(value: object) -> tuple[VerifyRule, ...]:
    """The structure only; modes and keys are checked by `validate`, which names the entry."""
    value = _yaml_text(value) or []
    if not isinstance(value, list):
        raise ValueError
    rules = []
    for item in value:
        if not isinstance(item, Mapping) or set(item) - {"repositories", "keys", "mode"}:
            raise ValueError
        keys = item.get("keys")
        keys = (keys,) if isinstance(keys, str) else _parse_list(keys or [])
        repositories = _parse_list(item.get("repositories", ["*"]))
        rules.append(VerifyRule(repositories, keys, str(item.get("mode", "enforce")).lower()))
    return tuple(rules)


@dataclass(frozen=True)
class Kind:
    """How one option's value (from YAML, a variable or a flag) is parsed, and what the operator
    is told it expects when it cannot be: the parser raises ValueError or TypeError, the loader
    turns that into the one-line ConfigError naming the key."""

    parse: Callable[[Any], object]
    expected: str


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(values[:-1]) + " or " + values[-1]


def choice(options: Any) -> Kind:
    """A `Literal[...]` type's values, case-insensitive (`INFO` is `info`, YAML's `true` is
    `"true"`); the annotation and the parser share one list."""
    values: tuple[str, ...] = get_args(options)

    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in values:
            raise ValueError
        return text

    return Kind(parse, _one_of(values))


def _parse_action(value: object) -> Action:
    text = str(value).strip().lower()
    if text == "allow":
        return "allow"
    if text == "deny":
        return "deny"
    raise ValueError


STR = Kind(_parse_str, "a string")
FLOAT = Kind(_parse_float, "a number")
INT = Kind(_parse_int, "a whole number")
BOOL = Kind(_parse_bool, "true or false")
SIZE = Kind(parse_size, "a size such as 512MiB, 50GiB or a number of bytes")
DURATION = Kind(parse_duration, "a duration such as 30s, 10m, 12h or 30d")
PATH = Kind(lambda v: Path(_parse_str(v)).expanduser(), "a file system path")
FRACTION = Kind(_parse_fraction, "a fraction between 0 and 1 such as 0.9")
BUDGET = Kind(_parse_budget, "a size such as 50GiB, or a share of the disk such as 80%")
LIST = Kind(_parse_list, "a list of strings (comma-separated in the environment)")
GROUPS = Kind(_parse_groups, "a mapping of group names to lists of user names")
RULES = Kind(
    _parse_rules,
    "a list of rules, each {who: [...], repositories: [...], action: allow | deny,"
    " actions: [pull, push, delete]}",
)
VERIFY = Kind(
    _parse_verify,
    "a list of policies, each {repositories: [...], keys: [PEM or file], mode: enforce | warn}",
)
# Issue 22: the upstream's budget.
RATE = Kind(_parse_rate, "a rate such as 50MB/s or 400Mbit/s, or 0 (no limit)")
CREDENTIALS = Kind(
    _parse_credentials,
    "a list of accounts, each {username, password_file | password_env | password}",
)
# Parsed by `_with_upstreams` (each entry is a section of its own), never by `parse`.
UPSTREAMS = Kind(lambda v: v, "a mapping of upstream names to their options")


def opt(default: Any, kind: Kind, *, secret: bool = False) -> Any:
    """A config field parsed by `kind`; a None default makes it optional (null allowed), and
    `secret` ones are never printed (repr, error messages)."""
    metadata = {"kind": kind, "optional": default is None, "secret": secret}
    if isinstance(default, Mapping):  # read-only, yet dataclasses refuse it as a plain default
        return field(default_factory=lambda: default, repr=not secret, metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


_NO_MAPPING: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class CacheConfig:
    # Where blobs and manifests are kept; default /var/cache/registry-mirror.
    dir: Path = opt(Path("/var/cache/registry-mirror"), PATH)
    # Size limit: a size or a share of the file system ("80%"); "0" = no limit.
    max_size: str = opt("0", BUDGET)
    # Eviction starts past high_watermark x max_size and stops under low_watermark x max_size.
    high_watermark: float = opt(0.95, FRACTION)
    low_watermark: float = opt(0.85, FRACTION)
    # Evict blobs / manifests not served for this long; 0 = never.
    blob_ttl: float = opt(0.0, DURATION)
    manifest_ttl: float = opt(0.0, DURATION)
    # How often the eviction policy runs (default 60s; zero is refused).
    gc_interval: float = opt(60.0, DURATION)
    # Images never evicted (repo:tag or repo@digest); default none.
    pins: tuple[str, ...] = opt((), LIST)
    # A fill cut short by a crash leaves a partial blob that the next pull of it resumes
    # (asking the upstream only for the rest); kept this long since its last write (default
    # 1d) and up to this many bytes in all (default 4GiB), newest first. 0 = none kept.
    partial_max_age: float = opt(86400.0, DURATION)
    partial_max_size: int = opt(4 * 1024**3, SIZE)
    # When a client reads a cold blob faster than this disk writes it, keep sending at the
    # client's pace and fetch the part the disk missed again afterwards (true: for an upstream
    # on a fast local network), or make the client wait for the disk so that every byte
    # crosses the network once (false, default).
    outrun_disk: bool = opt(False, BOOL)

    def budget_bytes(self, filesystem_size: int) -> int:
        """The size limit in bytes (0: none); a percentage is of the cache's file system."""
        if self.max_size.endswith("%"):
            return int(filesystem_size * float(self.max_size[:-1]) / 100)
        return parse_size(self.max_size)


@dataclass(frozen=True)
class UpstreamConfig:
    # The registry pulled through to; default Docker Hub.
    url: str = opt(DOCKER_HUB_URL, STR)
    # Credentials; None (default): anonymous. The password after `load_config` is the resolved
    # one, whichever of password / password_file / password_env gave it.
    username: str | None = opt(None, STR)
    password: str | None = opt(None, STR, secret=True)
    password_file: Path | None = opt(None, PATH)
    # Names of environment variables holding the credentials (e.g. GHCR_TOKEN); default None.
    username_env: str | None = opt(None, STR)
    password_env: str | None = opt(None, STR)
    # TLS towards the upstream: a CA bundle to trust (PEM) instead of the system's (None), or
    # `insecure: true` to skip verification (labs only; default false).
    ca_file: Path | None = opt(None, PATH)
    insecure: bool = opt(False, BOOL)
    # Path prefixes that route to this upstream besides its registry host names
    # (`/v2/<alias>/owner/app/...`); default none.
    aliases: tuple[str, ...] = opt((), LIST)
    # At most this many requests to this upstream at once (blob streams included); 0 = no limit.
    max_concurrent_fetches: int = opt(64, INT)
    # auto (default): one-segment names mean library/<name> when the upstream is Docker Hub.
    library_prefix: LibraryPrefix = opt("auto", choice(LibraryPrefix))
    # Registry hosts this upstream stands for, matched against containerd's `?ns=` (requests
    # naming another registry are refused rather than answered with this one's content).
    # Empty (default): docker.io and its aliases for Docker Hub, else the URL's host[:port].
    names: tuple[str, ...] = opt((), LIST)
    # Where this upstream's blob redirects (and token realm) may lead. false (default): public
    # addresses, and addresses of the upstream's own kind (a registry on a private network may
    # use its storage there; one on this host, private ones too). true: loopback, private and
    # link-local addresses as well (e.g. a public registry whose storage is on your network).
    redirect_to_internal: bool = opt(False, BOOL)
    # A tag is answered from the cache this long (default 10m) before it is revalidated;
    # 0 = revalidated on every request.
    tag_ttl: float = opt(600.0, DURATION)
    # A referrers list (signatures, SBOMs) is answered from the cache this long (default 5m:
    # new signatures appear after the image), then asked again; 0 = asked every time.
    referrers_ttl: float = opt(300.0, DURATION)
    # Connection set-up and idle-read time-outs (default 10s, 60s); 0 = none.
    connect_timeout: float = opt(10.0, DURATION)
    read_timeout: float = opt(60.0, DURATION)
    # Retries of idempotent requests (default 3); 0 = one attempt.
    retries: int = opt(3, INT)
    # Largest manifest accepted from the upstream (default 4MiB).
    manifest_max_size: int = opt(4 * 1024 * 1024, SIZE)
    # -- the upstream's budget (Docker Hub's pull limit, a WAN link) --
    # A pool of accounts besides (or instead of) username/password, each
    # {username, password_file | password_env | password}: every request goes to the account
    # with the most pull budget left; one's 401 or 429 moves it to the next. Default none.
    credentials: tuple[Credential, ...] = opt((), CREDENTIALS)
    # Fewer pulls left than this (ratelimit-remaining): a tag past its TTL is answered from the
    # cache at once (Warning 110) and revalidated in the background by HEAD, which Docker Hub
    # does not count; a GET only if the tag moved. Default 5; 0 = off.
    budget_floor: int = opt(5, INT)
    # A revalidation HEAD slower than this answers the cached tag and finishes in the
    # background (default 2s; 0 = always in the background). A cold tag waits as ever.
    revalidate_timeout: float = opt(2.0, DURATION)
    # This upstream's bytes per second for all its fills (50MB/s, 400Mbit/s), shared fairly
    # between them; each of N workers takes 1/N. Default 0 = no limit.
    max_bandwidth: int = opt(0, RATE)
    # After a manifest is served, fetch its config and layers not cached yet in the background
    # (layers up to prefetch_max_size, default 1GiB; prefetch_concurrency at once, default 4).
    prefetch: bool = opt(True, BOOL)
    prefetch_max_size: int = opt(1024**3, SIZE)
    prefetch_concurrency: int = opt(4, INT)
    # Let anonymous clients pull this upstream's private images (those only the mirror's
    # credentials read): for a site that wants its paid account's images open to its network.
    # Default false; start-up warns when on.
    serve_private_to_anonymous: bool = opt(False, BOOL)

    @property
    def has_credentials(self) -> bool:
        return self.username is not None or bool(self.credentials)

    def accounts(self) -> list[tuple[str, str]]:
        """Every account to pull with, (username, password): username/password first."""
        first = [(self.username, self.password)] if self.username and self.password else []
        pool = [(c.username, c.password) for c in self.credentials if c.password is not None]
        return first + pool

    def registry_names(self) -> set[str]:
        if self.names:
            return set(self.names)
        parts = urlsplit(self.url)
        if (parts.hostname or "") in DOCKER_HUB_HOSTS:
            return set(DOCKER_HUB_HOSTS)
        return {parts.netloc}

    def uses_library_prefix(self) -> bool:
        if self.library_prefix == "auto":
            return (urlsplit(self.url).hostname or "") in DOCKER_HUB_HOSTS
        return self.library_prefix == "true"


@dataclass(frozen=True)
class AuthConfig:
    # Client authentication by HTTP Basic against an htpasswd file of bcrypt hashes
    # (`htpasswd -B`); None (default): no passwords (client certificates may still identify).
    htpasswd: Path | None = opt(None, PATH)
    realm: str = opt("registry-mirror", STR)
    # Whether clients without credentials may pull (public content, as `access` allows);
    # default true.
    anonymous: bool = opt(True, BOOL)
    # Users allowed the operator actions (pin, unpin, warm, evict); default none.
    admins: tuple[str, ...] = opt((), LIST)
    # Groups for access rules, {group: [user, ...]}; default none.
    groups: Mapping[str, tuple[str, ...]] = opt(_NO_MAPPING, GROUPS)


@dataclass(frozen=True)
class AccessConfig:
    # When no rule matches: allow (default) | deny.
    default: Action = opt("allow", choice(Action))
    # Tried in order, the first matching rule decides; default none.
    rules: tuple[AccessRule, ...] = opt((), RULES)


@dataclass(frozen=True)
class HostedConfig:
    """Repositories the mirror hosts itself (pushed to it) beside the ones it mirrors."""

    # Name globs of hosted repositories (`internal/*`: `*` spans `/`); default none. Such a
    # name is never mirrored; every other name is, and pushes to those are refused.
    repositories: tuple[str, ...] = opt((), LIST)
    # Name globs, each also hosted, whose pulls fall back to the upstream when the hosted
    # repository lacks the tag or digest (a "group"); default none.
    group: tuple[str, ...] = opt((), LIST)
    # Most bytes hosted content may take; 0 (default): no limit. Pushes past it are refused.
    quota: int = opt(0, SIZE)
    # Uploads untouched this long are abandoned and removed by `gc` (default 24h).
    upload_max_age: float = opt(86400.0, DURATION)
    # Blobs committed less than this long ago are never collected by `gc`: a push in progress
    # uploads its blobs before the manifest that references them (default 1h).
    gc_grace: float = opt(3600.0, DURATION)
    # Accept image manifests whose layers were not pushed ("sparse" manifests, OCI 1.1; the
    # config must still be there); default false: every distributable layer must be.
    sparse: bool = opt(False, BOOL)
    # Largest manifest accepted by a push (default 4MiB).
    manifest_max_size: int = opt(4 * 1024 * 1024, SIZE)


@dataclass(frozen=True)
class TlsConfig:
    # Serve HTTPS with this certificate chain and key (PEM); both None (default): plain HTTP.
    # SIGHUP reloads them without dropping connections.
    cert: Path | None = opt(None, PATH)
    key: Path | None = opt(None, PATH)
    # Ask clients for a certificate signed by this CA; its subject's CN is the user name.
    # None (default): no client certificates.
    client_ca: Path | None = opt(None, PATH)

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class LimitsConfig:
    # Longest request line or header line a client may send (default 8KiB; 1KiB at least).
    max_header_size: int = opt(8 * 1024, SIZE)
    # A request must have its response started within this long, upstream waits included
    # (default 2m; zero is refused).
    request_timeout: float = opt(120.0, DURATION)
    # Idle keep-alive connections are closed after this long (default 75s; zero is refused).
    idle_timeout: float = opt(75.0, DURATION)
    # Requests per second per client address (or user) with bursts of client_burst
    # (default 100); 0 (default) = off.
    client_rate: float = opt(0.0, FLOAT)
    client_burst: int = opt(100, INT)


@dataclass(frozen=True)
class LogConfig:
    # Default info.
    level: LogLevel = opt("info", choice(LogLevel))
    # auto (default): JSON lines when stderr is not a terminal, readable lines when it is.
    format: LogFormat = opt("auto", choice(LogFormat))


@dataclass(frozen=True)
class S3Config:
    # S3-compatible endpoint (http://127.0.0.1:8333 for SeaweedFS, MinIO...); "" (default) = AWS.
    endpoint: str = opt("", STR)
    region: str = opt("us-east-1", STR)
    bucket: str = opt("registry-mirror", STR)
    # Keys are <prefix>blobs/sha256/<2 hex>/<hex>, like the disk layout; default "".
    prefix: str = opt("", STR)
    # Credentials (default None: the SDK's own chain); after `load_config` the resolved ones.
    access_key: str | None = opt(None, STR)
    secret_key: str | None = opt(None, STR, secret=True)
    access_key_env: str | None = opt(None, STR)
    secret_key_env: str | None = opt(None, STR)
    secret_key_file: Path | None = opt(None, PATH)
    # Multipart upload part size (default 8MiB; S3's minimum is 5MiB).
    part_size: int = opt(8 * 1024 * 1024, SIZE)
    # Keep a copy of what this node serves on its own disk (cache.dir, within cache.max_size)
    # so hits are sent by sendfile (default true); false: stream every hit from the store.
    local_tier: bool = opt(True, BOOL)
    # Answer cached blob GETs with a 307 to a presigned URL instead of streaming them
    # (default false), valid for presign_ttl (default 15m).
    presigned_redirects: bool = opt(False, BOOL)
    presign_ttl: float = opt(900.0, DURATION)
    # The shared store's own budget and TTL (cache.max_size / blob_ttl are each node's tier):
    # one node at a time evicts least recently served objects past the high watermark, and
    # objects not served for `ttl`; never pinned ones, never one a node is streaming.
    # 0 (default) = no budget, no TTL.
    max_size: int = opt(0, SIZE)
    ttl: float = opt(0.0, DURATION)


@dataclass(frozen=True)
class StorageConfig:
    # filesystem (default): blobs on cache.dir only. s3: the shared store is S3-compatible
    # object storage (the `cluster` extra), and cache.dir is this node's local tier in front
    # of it (cache.max_size).
    kind: StorageKind = opt("filesystem", choice(StorageKind))
    s3: S3Config = field(default_factory=S3Config)


@dataclass(frozen=True)
class MetadataConfig:
    # local (default): tags, index and fill locks on this node (cache.dir). redis: shared by
    # every node (the `cluster` extra).
    kind: MetadataKind = opt("local", choice(MetadataKind))
    redis_url: str = opt("redis://127.0.0.1:6379/0", STR)
    key_prefix: str = opt("registry-mirror:", STR)


@dataclass(frozen=True)
class ClusterConfig:
    # This node's name in locks and logs; "" (default): <hostname>:<port>.
    node_id: str = opt("", STR)
    # How other nodes reach this one (its internal fill endpoint), e.g. http://10.0.0.1:5000;
    # "" (default): http://<listen address> (fine when it is not 0.0.0.0).
    advertise_url: str = opt("", STR)
    # Shared secret for the internal /_cluster/ endpoints (only cluster members may call);
    # required with metadata.kind redis. After `load_config`, the resolved one.
    secret: str | None = opt(None, STR, secret=True)
    secret_file: Path | None = opt(None, PATH)
    # A fill lock's lease: renewed by its owner; a dead owner's lock frees after this long
    # (default 10s; 1s at least).
    fill_lease: float = opt(10.0, DURATION)
    # Nodes serving HTTPS with certificates from a private CA: trust this CA bundle (PEM) when
    # streaming from each other; None (default): the system's trust store.
    ca_file: Path | None = opt(None, PATH)


@dataclass(frozen=True)
class MetricsConfig:
    # "" (default): /metrics is served on the main listener. HOST:PORT: only there instead.
    listen: str = opt("", STR)


@dataclass(frozen=True)
class UiConfig:
    """The operator page: at `/ui/` by default; `ui: false` turns it off, `ui: /ops/` moves it."""

    enabled: bool = True
    path: str = "/ui/"


_UI_RESERVED = ("/v2/", "/token/", "/metrics/", "/healthz/", "/readyz/")


def _parse_ui(value: object) -> UiConfig:
    """`true`/`false`, a path such as `/ui/`, or a mapping `{enabled, path}`."""
    enabled, path = True, "/ui/"
    if isinstance(value, Mapping):
        if set(value) - {"enabled", "path"}:
            raise ValueError
        enabled = _parse_bool(value.get("enabled", True))
        path = _parse_str(value.get("path", path))
    elif isinstance(value, str) and value.strip().startswith("/"):
        path = value.strip()
    else:
        enabled = _parse_bool(value)
    path = "/" + path.strip("/") + "/"
    if path == "//" or not re.fullmatch(r"[A-Za-z0-9/_.-]+", path):
        raise ValueError
    if any((path + "x").startswith(r) or r.startswith(path) for r in _UI_RESERVED):
        raise ValueError  # would shadow the registry API or the operator endpoints
    return UiConfig(enabled, path)


UI = Kind(
    _parse_ui,
    "true, false, a path such as /ui/, or {enabled: true|false, path: /ui/}"
    " (not under /v2/, /token, /metrics, /healthz or /readyz)",
)


@dataclass(frozen=True)
class Config:
    # Address of the registry API, HOST:PORT (default 0.0.0.0:5000); port 0: any free port.
    listen: str = opt("0.0.0.0:5000", STR)
    # Never contact any upstream: serve only what the cache holds (tags whatever their age);
    # default false.
    offline: bool = opt(False, BOOL)
    # Processes serving the port together (one socket, bound by the instance);
    # 0 (default) = one per CPU core.
    workers: int = opt(0, INT)
    # On SIGTERM/SIGINT: stop accepting, give responses in flight this long (default 30s; 0:
    # none), then exit 0.
    shutdown_timeout: float = opt(30.0, DURATION)
    # containerd's ?ns= naming a registry no upstream stands for: refuse (false, default), or
    # pull from https://<ns> anonymously (true: an open proxy to any registry; think twice).
    allow_any_upstream: bool = opt(False, BOOL)

    cache: CacheConfig = field(default_factory=CacheConfig)
    # The default upstream (Docker Hub unless set): names without a registry prefix go here.
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    # More upstreams by name (default none), each with the options of `upstream`; reached by
    # ?ns=<host> or a path prefix /v2/<host or alias>/<repository>/...
    upstreams: Mapping[str, UpstreamConfig] = opt(_NO_MAPPING, UPSTREAMS)
    auth: AuthConfig = field(default_factory=AuthConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    hosted: HostedConfig = field(default_factory=HostedConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ui: UiConfig = opt(UiConfig(), UI)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Only signed images: cosign signatures checked before a tag's manifest is served, for
    # the repositories each policy names (first match decides); default none (off).
    verify: tuple[VerifyRule, ...] = opt((), VERIFY)

    def worker_count(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

    @property
    def clustered(self) -> bool:
        return self.metadata.kind == "redis" or self.storage.kind == "s3"

    def listen_address(self) -> tuple[str, int]:
        return split_host_port(self.listen, "listen")


def split_host_port(value: str, key: str) -> tuple[str, int]:
    """`HOST:PORT`, `[::1]:PORT` or `:PORT` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected HOST:PORT such as 0.0.0.0:5000, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _fields(section: DataclassInstance) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(section)}


def _parse(key: str, f: dataclasses.Field[Any], raw: object) -> object:
    """`raw` as the field's kind, or the one-line error naming `key`."""
    kind: Kind = f.metadata["kind"]
    if raw is None:
        if not f.metadata["optional"]:
            raise ConfigError(key, f"expected {kind.expected}, got nothing")
        return None
    try:
        return kind.parse(raw)
    except (ValueError, TypeError):
        shown = "***" if f.metadata["secret"] else repr(raw)
        raise ConfigError(key, f"expected {kind.expected}, got {shown}") from None


def _with_mapping(section: _Section, data: Mapping[str, Any], prefix: str = "") -> _Section:
    """`section` with the options of `data` (a parsed YAML mapping) applied."""
    fields = _fields(section)
    changes: dict[str, object] = {}
    for name, raw in data.items():
        key = f"{prefix}{name}"
        f = fields.get(str(name))
        if f is None:
            known = ", ".join(sorted(fields))
            raise ConfigError(key, f"unknown option (known here: {known})")
        kind = f.metadata.get("kind")
        if kind is UPSTREAMS:
            changes[f.name] = _with_upstreams(getattr(section, f.name), key, raw)
        elif kind is not None:
            changes[f.name] = _parse(key, f, raw)
        elif raw is None:
            continue
        elif isinstance(raw, Mapping):
            changes[f.name] = _with_mapping(getattr(section, f.name), raw, f"{key}.")
        else:
            raise ConfigError(key, "expected a section (a mapping of options)")
    return dataclasses.replace(section, **changes)


UPSTREAM_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _with_upstreams(
    upstreams: Mapping[str, UpstreamConfig], key: str, raw: object
) -> Mapping[str, UpstreamConfig]:
    """`upstreams: {name: {url: ..., ...}}`: each entry takes the options of `upstream`."""
    if raw is None:
        return upstreams
    if not isinstance(raw, Mapping):
        raise ConfigError(key, "expected a mapping of upstream names to their options")
    merged = dict(upstreams)
    for name, options in raw.items():
        name = str(name)
        if not UPSTREAM_NAME_RE.fullmatch(name) or name == "default":
            raise ConfigError(
                f"{key}.{name}",
                "expected a name of lowercase letters, digits, '.', '_' or '-' (not 'default')",
            )
        upstream = merged.get(name) or UpstreamConfig()
        if options is not None:
            if not isinstance(options, Mapping):
                raise ConfigError(f"{key}.{name}", "expected a section (a mapping of options)")
            upstream = _with_mapping(upstream, options, f"{key}.{name}.")
        merged[name] = upstream
    return MappingProxyType(merged)


def _env_var(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").replace("-", "_").upper()


def _with_env(
    section: _Section, env: Mapping[str, str], known: set[str], prefix: str = ""
) -> _Section:
    """`section` with its `REGISTRY_MIRROR_<SECTION>_<KEY>` variables applied; every variable
    it could have read is added to `known`."""
    changes: dict[str, object] = {}
    for name, f in _fields(section).items():
        key = f"{prefix}{name}"
        kind = f.metadata.get("kind")
        if kind is UPSTREAMS:
            # Only for upstreams the file names: REGISTRY_MIRROR_UPSTREAMS_<NAME>_<KEY>.
            upstreams = getattr(section, name)
            changes[name] = MappingProxyType(
                {n: _with_env(u, env, known, f"{key}.{n}.") for n, u in upstreams.items()}
            )
        elif kind is None:
            changes[name] = _with_env(getattr(section, name), env, known, f"{key}.")
        else:
            var = _env_var(key)
            known.add(var)
            if var in env:
                changes[name] = _parse(f"{key} (from {var})", f, env[var])
    return dataclasses.replace(section, **changes)


def _check_env_names(config: Config, env: Mapping[str, str], known: set[str]) -> None:
    """A misspelt `REGISTRY_MIRROR_*` variable is an error, as a misspelt key in the file is:
    silently ignoring it would run the mirror on a value the operator did not choose.

    Variables of our prefix that a `*_env` option names hold secrets, not options: allowed.
    (Every `REGISTRY_MIRROR_*` the project sets itself is an option: the supervisor's
    REGISTRY_MIRROR_WORKERS=1 for its workers, the test fixtures' LOG_FORMAT and others.)
    """
    allowed = known | _secret_variables(config)
    for var in sorted(v for v in env if v.startswith(ENV_PREFIX) and v not in allowed):
        named = ENV_PREFIX + "UPSTREAMS_"  # hint within the same kind of variable
        alike = sorted(k for k in known if k.startswith(named) == var.startswith(named))
        hint = difflib.get_close_matches(var, alike, n=1)
        if hint:
            message = f"no such option; did you mean {hint[0]}?"
        elif var.startswith(named):
            message = "no such option (an upstream's variables need it named in the file)"
        else:
            message = "no such option (variables are REGISTRY_MIRROR_<SECTION>_<KEY>)"
        raise ConfigError(var, message)


def _secret_variables(config: Config) -> set[str]:
    """Variables named by `*_env` options (`password_env: GHCR_TOKEN`)."""
    sections: list[DataclassInstance] = [
        config.upstream,
        *config.upstreams.values(),
        config.storage.s3,
    ]
    sections += [c for up in (config.upstream, *config.upstreams.values()) for c in up.credentials]
    return {
        value
        for section in sections
        for name in _fields(section)
        if name.endswith("_env") and (value := getattr(section, name)) is not None
    }


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Defaults, then the YAML file, then `REGISTRY_MIRROR_*` variables, then dotted overrides;
    then secrets, checks and packages (see the module's docstring). The result is frozen."""
    config = Config()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise ConfigError("--config", f"{path} must hold a mapping of sections")
        config = _with_mapping(config, data)
    env = os.environ if env is None else env
    known: set[str] = set()
    config = _with_env(config, env, known)
    _check_env_names(config, env, known)
    for key, value in (overrides or {}).items():
        if value is not None:
            *sections, name = key.split(".")
            config = _with_mapping(config, _nest(sections, {name: value}))
    config = resolve_secrets(config, env)
    validate(config)
    require_extras(config)
    return config


def _nest(sections: list[str], leaf: dict[str, object]) -> dict[str, Any]:
    data: dict[str, Any] = leaf
    for section in reversed(sections):
        data = {section: data}
    return data


def resolve_secrets(config: Config, env: Mapping[str, str]) -> Config:
    """`config` with every `<name>_file` and `<name>_env` replaced by the secret it names.

    The one place that reads secret files and variables: after the shape is parsed (so a
    typo is reported before any file is opened), before `validate` (which then checks the
    credentials the mirror will really use, e.g. a username without a password)."""
    s3 = _with_secrets(config.storage.s3, "storage.s3", env, ("access_key", "secret_key"))
    return dataclasses.replace(
        config,
        upstream=_upstream_secrets(config.upstream, "upstream", env),
        upstreams=MappingProxyType(
            {
                name: _upstream_secrets(up, f"upstreams.{name}", env)
                for name, up in config.upstreams.items()
            }
        ),
        storage=dataclasses.replace(config.storage, s3=s3),
        cluster=_with_secrets(config.cluster, "cluster", env, ("secret",)),
    )


def _upstream_secrets(up: UpstreamConfig, key: str, env: Mapping[str, str]) -> UpstreamConfig:
    """An upstream's credentials, and each pool account's password, resolved."""
    up = _with_secrets(up, key, env, ("username", "password"))
    pool = tuple(
        _with_secrets(c, f"{key}.credentials[{i}]", env, ("password",))
        for i, c in enumerate(up.credentials)
    )
    return dataclasses.replace(up, credentials=pool)


def _with_secrets(
    section: _Section, key: str, env: Mapping[str, str], names: tuple[str, ...]
) -> _Section:
    """`<name>_file` set: the file's content (stripped); `<name>_env` set: that variable's
    value, which must exist (the variable wins if both are set)."""
    fields = _fields(section)
    changes: dict[str, str] = {}
    for name in names:
        path = getattr(section, f"{name}_file") if f"{name}_file" in fields else None
        if path is not None:
            try:
                changes[name] = path.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"{key}.{name}_file", f"cannot read {path}: {exc.strerror}"
                ) from None
        var = getattr(section, f"{name}_env") if f"{name}_env" in fields else None
        if var is not None:
            if var not in env:
                raise ConfigError(f"{key}.{name}_env", f"${var} is not set")
            changes[name] = env[var]
    return dataclasses.replace(section, **changes)


# An option's value that needs a package only the `cluster` extra installs.
_EXTRAS: tuple[tuple[str, str, str], ...] = (
    ("storage.kind", "s3", "aiobotocore"),
    ("metadata.kind", "redis", "redis"),
)


def require_extras(config: Config) -> None:
    """A cluster option without its package stops start-up with the line that fixes it,
    rather than an ImportError from deep inside the node's assembly."""
    chosen = {"storage.kind": config.storage.kind, "metadata.kind": config.metadata.kind}
    for key, value, module in _EXTRAS:
        if chosen[key] == value and importlib.util.find_spec(module) is None:
            raise ConfigError(key, f"{value} needs the {module} package: {CLUSTER_EXTRA}")


def _validate_upstream(up: UpstreamConfig, key: str) -> None:
    parts = urlsplit(up.url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{key}.url", f"expected an http(s) URL, got {up.url!r}")
    if (up.username is None) != (up.password is None):
        raise ConfigError(f"{key}.username", "username and password go together")
    if up.ca_file is not None and not up.ca_file.is_file():
        raise ConfigError(f"{key}.ca_file", f"cannot read {up.ca_file}")
    for name in ("tag_ttl", "referrers_ttl", "connect_timeout", "read_timeout"):
        if getattr(up, name) < 0:
            raise ConfigError(f"{key}.{name}", "expected a duration of zero or more")
    if up.retries < 0:
        raise ConfigError(f"{key}.retries", "expected zero or more")
    if up.max_concurrent_fetches < 0:
        raise ConfigError(f"{key}.max_concurrent_fetches", "expected 0 (no limit) or more")
    for i, account in enumerate(up.credentials):
        if account.password is None:
            raise ConfigError(
                f"{key}.credentials[{i}]", "expected password_file, password_env or password"
            )
    names = [name for name, _ in up.accounts()]
    if len(set(names)) < len(names):
        raise ConfigError(f"{key}.credentials", "each account may appear once")
    for name in ("budget_floor", "max_bandwidth", "revalidate_timeout", "prefetch_max_size"):
        if getattr(up, name) < 0:
            raise ConfigError(f"{key}.{name}", "expected zero or more")
    if up.prefetch_concurrency < 1:
        raise ConfigError(f"{key}.prefetch_concurrency", "expected 1 or more")


def _validate_front_door(config: Config) -> None:
    auth, tls, limits = config.auth, config.tls, config.limits
    if auth.htpasswd is not None and not auth.htpasswd.is_file():
        raise ConfigError("auth.htpasswd", f"cannot read {auth.htpasswd}")
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError("tls.cert", "cert and key go together")
    for name in ("cert", "key", "client_ca"):
        path = getattr(tls, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"tls.{name}", f"cannot read {path}")
    if tls.client_ca is not None and tls.cert is None:
        raise ConfigError("tls.client_ca", "client certificates need tls.cert and tls.key")
    if limits.max_header_size < 1024:
        raise ConfigError("limits.max_header_size", "expected 1KiB or more")
    for name in ("request_timeout", "idle_timeout"):
        if getattr(limits, name) <= 0:
            raise ConfigError(f"limits.{name}", "expected a duration above zero")
    if limits.client_rate < 0 or limits.client_burst < 1:
        raise ConfigError("limits.client_rate", "expected a rate of 0 (off) or more, burst 1+")


def _validate_cluster(config: Config) -> None:
    storage, metadata, cluster = config.storage, config.metadata, config.cluster
    s3 = storage.s3
    if storage.kind == "s3":
        if s3.endpoint and urlsplit(s3.endpoint).scheme not in {"http", "https"}:
            raise ConfigError(
                "storage.s3.endpoint", f"expected an http(s) URL, got {s3.endpoint!r}"
            )
        if not s3.bucket:
            raise ConfigError("storage.s3.bucket", "expected a bucket name")
        if s3.part_size < 5 * 1024 * 1024:
            raise ConfigError("storage.s3.part_size", "expected 5MiB or more (S3's minimum)")
    if metadata.kind == "redis" and urlsplit(metadata.redis_url).scheme not in {
        "redis", "rediss", "unix"
    }:  # fmt: skip
        raise ConfigError("metadata.redis_url", "expected redis://HOST:PORT/DB (or rediss://)")
    if cluster.advertise_url and urlsplit(cluster.advertise_url).scheme not in {"http", "https"}:
        raise ConfigError("cluster.advertise_url", "expected an http(s) URL")
    if cluster.ca_file is not None and not cluster.ca_file.is_file():
        raise ConfigError("cluster.ca_file", f"cannot read {cluster.ca_file}")
    if cluster.fill_lease < 1:
        raise ConfigError("cluster.fill_lease", "expected a duration of 1s or more")
    if metadata.kind == "redis" and not cluster.secret:
        raise ConfigError("cluster.secret", "nodes sharing Redis need a shared secret")


def validate(config: Config) -> None:
    """Cross-field and semantic checks that a type alone cannot express; reads, never changes,
    the config (choices are already checked by their `Literal` kinds, secrets resolved)."""
    config.listen_address()
    if config.workers < 0:
        raise ConfigError("workers", "expected 0 (one per core) or more")
    if config.metrics.listen:
        split_host_port(config.metrics.listen, "metrics.listen")
    cache = config.cache
    if cache.low_watermark >= cache.high_watermark:
        raise ConfigError("cache.low_watermark", "expected less than cache.high_watermark")
    for key in ("blob_ttl", "manifest_ttl"):
        if getattr(cache, key) < 0:
            raise ConfigError(f"cache.{key}", "expected a duration of zero (never) or more")
    if cache.gc_interval <= 0:
        raise ConfigError("cache.gc_interval", "expected a duration above zero")
    for pin in cache.pins:
        try:
            parse_image(pin)
        except RegistryError as exc:
            raise ConfigError(
                "cache.pins", f"{pin!r} is not an image reference: {exc.message}"
            ) from None
    _validate_upstream(config.upstream, "upstream")
    hosts: dict[str, str] = {}
    for name, upstream in config.upstreams.items():
        key = f"upstreams.{name}"
        _validate_upstream(upstream, key)
        for host in [*upstream.registry_names(), *upstream.aliases]:
            if host in hosts:
                raise ConfigError(f"{key}", f"{host!r} also names upstreams.{hosts[host]}")
            if "/" in host or not host:
                raise ConfigError(f"{key}.aliases", f"expected one path segment, got {host!r}")
            hosts[host] = name
    _validate_front_door(config)
    _validate_cluster(config)
    _validate_verify(config.verify)
    _validate_hosted(config)


def _validate_verify(rules: tuple[VerifyRule, ...]) -> None:
    for i, rule in enumerate(rules):
        key = f"verify[{i}]"
        if rule.mode not in ("enforce", "warn"):
            raise ConfigError(f"{key}.mode", f"expected enforce or warn, got {rule.mode!r}")
        if not rule.keys or not rule.repositories:
            raise ConfigError(key, "expected at least one repository and one key")
        for j, text in enumerate(rule.keys):
            try:
                from mirror.signatures import load_public_key  # cryptography: when used

                load_public_key(read_key(text))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{key}.keys[{j}]", str(exc)) from None


def read_key(text: str) -> bytes:
    """A key given inline (PEM text) or as a file holding it."""
    if "-----BEGIN" in text:
        return text.encode()
    path = Path(text).expanduser()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc.strerror}") from None


def _validate_hosted(config: Config) -> None:
    """A name is hosted or mirrored, never both: no hosted pattern may start with a path
    prefix that routes to an upstream (its host or alias)."""
    hosted = config.hosted
    prefixes = {host: "upstream" for host in config.upstream.registry_names()}
    for name, upstream in config.upstreams.items():
        for host in [*upstream.registry_names(), *upstream.aliases]:
            prefixes[host] = f"upstreams.{name}"
    for pattern in hosted.repositories:
        if not pattern or pattern.startswith("/") or " " in pattern:
            raise ConfigError("hosted.repositories", f"expected a name glob, got {pattern!r}")
        first = pattern.split("/", 1)[0]
        if first in prefixes:
            raise ConfigError(
                "hosted.repositories",
                f"{pattern!r} names are mirrored from {prefixes[first]} ({first!r}); "
                "a name is either hosted or mirrored, never both",
            )
    for pattern in hosted.group:
        if not any(fnmatch.fnmatchcase(pattern, p) for p in hosted.repositories):
            raise ConfigError("hosted.group", f"{pattern!r} is not covered by hosted.repositories")
    if "hosted" in config.upstreams:
        raise ConfigError("upstreams.hosted", "the name 'hosted' is kept for hosted rules")
    shared = config.metadata.kind == "redis" and config.storage.kind == "s3"
    if hosted.repositories and config.clustered and not shared:
        raise ConfigError(
            "hosted.repositories",
            "hosted repositories in a cluster need both metadata.kind: redis and"
            " storage.kind: s3 (pushes must be visible from every node)",
        )
    if hosted.manifest_max_size <= 0:
        raise ConfigError("hosted.manifest_max_size", "expected a size above zero")
