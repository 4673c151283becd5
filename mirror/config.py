"""Configuration: dataclasses filled from YAML, then environment, then command-line flags.

Every option has a default here and a line in `conf/mirror.yaml`. A bad value stops start-up with
one line naming the key and what it expects (`ConfigError`), never a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mirror.errors import RegistryError
from mirror.reference import parse_image

ENV_PREFIX = "REGISTRY_MIRROR_"
DOCKER_HUB_URL = "https://registry-1.docker.io"
DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "docker.io", "index.docker.io"})

_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_IUNITS = {"ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", re.IGNORECASE)
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


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


def _parse_str(value: object) -> str:
    if isinstance(value, dict | list):
        raise ValueError
    return str(value)


# kind -> (parser, what the operator is told is expected)
_KINDS: dict[str, tuple[Any, str]] = {
    "str": (_parse_str, "a string"),
    "float": (lambda v: _parse_float(v), "a number"),
    "int": (_parse_int, "a whole number"),
    "bool": (_parse_bool, "true or false"),
    "size": (parse_size, "a size such as 512MiB, 50GiB or a number of bytes"),
    "duration": (parse_duration, "a duration such as 30s, 10m, 12h or 30d"),
    "path": (lambda v: Path(_parse_str(v)).expanduser(), "a file system path"),
    "fraction": (lambda v: _parse_fraction(v), "a fraction between 0 and 1 such as 0.9"),
    "budget": (
        lambda v: _parse_budget(v),
        "a size such as 50GiB, or a share of the disk such as 80%",
    ),
    "list": (lambda v: _parse_list(v), "a list of strings (comma-separated in the environment)"),
    "groups": (lambda v: _parse_groups(v), "a mapping of group names to lists of user names"),
    "rules": (
        lambda v: _parse_rules(v),
        "a list of rules, each {who: [...], repositories: [...], action: allow | deny}",
    ),
}


def _parse_float(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(str(value))


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


def _parse_list(value: object) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError


def _yaml_text(value: object) -> object:
    """Structured options may come from the environment as YAML (or JSON) text."""
    if isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError from None
    return value


def _parse_groups(value: object) -> dict[str, list[str]]:
    value = _yaml_text(value) or {}
    if not isinstance(value, Mapping):
        raise ValueError
    return {str(k): _parse_list(v) for k, v in value.items()}


@dataclass(frozen=True)
class AccessRule:
    who: tuple[str, ...]
    repositories: tuple[str, ...]
    action: str  # allow | deny


def _parse_rules(value: object) -> list[AccessRule]:
    value = _yaml_text(value) or []
    if not isinstance(value, list):
        raise ValueError
    rules = []
    for item in value:
        if not isinstance(item, Mapping) or set(item) - {"who", "repositories", "action"}:
            raise ValueError
        action = str(item.get("action", "allow"))
        if action not in {"allow", "deny"}:
            raise ValueError
        who = _parse_list(item.get("who", ["*"]))
        repositories = _parse_list(item.get("repositories", ["*"]))
        if not who or not repositories:
            raise ValueError
        rules.append(AccessRule(tuple(who), tuple(repositories), action))
    return rules


def opt(default: Any, kind: str, *, optional: bool = False, secret: bool = False) -> Any:
    """A config field with its parser kind; `secret` ones are never printed."""
    return field(
        default=default,
        repr=not secret,
        metadata={"kind": kind, "optional": optional, "secret": secret},
    )


@dataclass
class CacheConfig:
    dir: Path = opt(Path("/var/cache/registry-mirror"), "path")
    max_size: str = opt("0", "budget")
    high_watermark: float = opt(0.95, "fraction")
    low_watermark: float = opt(0.85, "fraction")
    blob_ttl: float = opt(0.0, "duration")
    manifest_ttl: float = opt(0.0, "duration")
    gc_interval: float = opt(60.0, "duration")
    pins: list[str] = field(
        default_factory=list, metadata={"kind": "list", "optional": False, "secret": False}
    )

    def budget_bytes(self, filesystem_size: int) -> int:
        """The size limit in bytes (0: none); a percentage is of the cache's file system."""
        if self.max_size.endswith("%"):
            return int(filesystem_size * float(self.max_size[:-1]) / 100)
        return parse_size(self.max_size)


@dataclass
class UpstreamConfig:
    url: str = opt(DOCKER_HUB_URL, "str")
    username: str | None = opt(None, "str", optional=True)
    password: str | None = opt(None, "str", optional=True, secret=True)
    password_file: Path | None = opt(None, "path", optional=True)
    # Names of environment variables holding the credentials (e.g. GHCR_TOKEN).
    username_env: str | None = opt(None, "str", optional=True)
    password_env: str | None = opt(None, "str", optional=True)
    # TLS towards the upstream: a CA bundle to trust (PEM) instead of the system's, or
    # `insecure: true` to skip verification (labs only).
    ca_file: Path | None = opt(None, "path", optional=True)
    insecure: bool = opt(False, "bool")
    # Path prefixes that route to this upstream besides its registry host names
    # (`/v2/<alias>/owner/app/...`).
    aliases: list[str] = field(
        default_factory=list, metadata={"kind": "list", "optional": False, "secret": False}
    )
    # At most this many requests to this upstream at once (blob streams included); 0 = no limit.
    max_concurrent_fetches: int = opt(64, "int")
    # auto: one-segment names mean library/<name> when the upstream is Docker Hub.
    library_prefix: str = opt("auto", "str")
    # Registry hosts this upstream stands for, matched against containerd's `?ns=` (requests
    # naming another registry are refused rather than answered with this one's content).
    # Empty: docker.io and its aliases for Docker Hub, else the URL's host[:port].
    names: list[str] = field(
        default_factory=list, metadata={"kind": "list", "optional": False, "secret": False}
    )
    # Where this upstream's blob redirects (and token realm) may lead. false: public addresses,
    # and addresses of the upstream's own kind (a registry on a private network may use its
    # storage there; one on this host, private ones too). true: loopback, private and
    # link-local addresses as well (e.g. a public registry whose storage is on your network).
    redirect_to_internal: bool = opt(False, "bool")
    tag_ttl: float = opt(600.0, "duration")
    connect_timeout: float = opt(10.0, "duration")
    read_timeout: float = opt(60.0, "duration")
    retries: int = opt(3, "int")
    manifest_max_size: int = opt(4 * 1024 * 1024, "size")

    @property
    def has_credentials(self) -> bool:
        return self.username is not None

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


@dataclass
class AuthConfig:
    # Client authentication by HTTP Basic against an htpasswd file of bcrypt hashes
    # (`htpasswd -B`); None: no passwords (client certificates may still identify users).
    htpasswd: Path | None = opt(None, "path", optional=True)
    realm: str = opt("registry-mirror", "str")
    # Whether clients without credentials may pull (public content, as `access` allows).
    anonymous: bool = opt(True, "bool")
    # Users allowed the operator actions (pin, unpin, warm, evict).
    admins: list[str] = field(
        default_factory=list, metadata={"kind": "list", "optional": False, "secret": False}
    )
    groups: dict[str, list[str]] = field(
        default_factory=dict, metadata={"kind": "groups", "optional": False, "secret": False}
    )


@dataclass
class AccessConfig:
    # When no rule matches: allow | deny.
    default: str = opt("allow", "str")
    rules: list[AccessRule] = field(
        default_factory=list, metadata={"kind": "rules", "optional": False, "secret": False}
    )


@dataclass
class TlsConfig:
    # Serve HTTPS with this certificate chain and key (PEM); both unset: plain HTTP.
    # SIGHUP reloads them without dropping connections.
    cert: Path | None = opt(None, "path", optional=True)
    key: Path | None = opt(None, "path", optional=True)
    # Ask clients for a certificate signed by this CA; its subject's CN is the user name.
    client_ca: Path | None = opt(None, "path", optional=True)

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass
class LimitsConfig:
    # Longest request line or header line a client may send.
    max_header_size: int = opt(8 * 1024, "size")
    # A request must have its response started within this long (upstream waits included).
    request_timeout: float = opt(120.0, "duration")
    # Idle keep-alive connections are closed after this long.
    idle_timeout: float = opt(75.0, "duration")
    # Requests per second per client address (or user) with bursts of client_burst; 0 = off.
    client_rate: float = opt(0.0, "float")
    client_burst: int = opt(100, "int")


@dataclass
class LogConfig:
    level: str = opt("info", "str")
    # auto: JSON lines when stderr is not a terminal, readable lines when it is.
    format: str = opt("auto", "str")


@dataclass
class S3Config:
    # S3-compatible endpoint (http://127.0.0.1:8333 for SeaweedFS, MinIO...); empty = AWS.
    endpoint: str = opt("", "str")
    region: str = opt("us-east-1", "str")
    bucket: str = opt("registry-mirror", "str")
    # Keys are <prefix>blobs/sha256/<2 hex>/<hex>, like the disk layout.
    prefix: str = opt("", "str")
    access_key: str | None = opt(None, "str", optional=True)
    secret_key: str | None = opt(None, "str", optional=True, secret=True)
    access_key_env: str | None = opt(None, "str", optional=True)
    secret_key_env: str | None = opt(None, "str", optional=True)
    secret_key_file: Path | None = opt(None, "path", optional=True)
    # Multipart upload part size (S3's minimum is 5MiB).
    part_size: int = opt(8 * 1024 * 1024, "size")
    # Answer cached blob GETs with a 307 to a presigned URL instead of streaming them.
    # Keep a copy of what this node serves on its own disk (cache.dir, within cache.max_size)
    # so hits are sent by sendfile; false: stream every hit from the store.
    local_tier: bool = opt(True, "bool")
    presigned_redirects: bool = opt(False, "bool")
    presign_ttl: float = opt(900.0, "duration")
    # The shared store's own budget and TTL (cache.max_size / blob_ttl are each node's tier):
    # one node at a time evicts least recently served objects past the high watermark, and
    # objects not served for `ttl`; never pinned ones, never one a node is streaming.
    max_size: int = opt(0, "size")
    ttl: float = opt(0.0, "duration")


@dataclass
class StorageConfig:
    # filesystem: blobs on cache.dir only. s3: the shared store is S3-compatible object
    # storage, and cache.dir is this node's local tier in front of it (cache.max_size).
    kind: str = opt("filesystem", "str")
    s3: S3Config = field(default_factory=S3Config)


@dataclass
class MetadataConfig:
    # local: tags, index and fill locks on this node (cache.dir). redis: shared by every node.
    kind: str = opt("local", "str")
    redis_url: str = opt("redis://127.0.0.1:6379/0", "str")
    key_prefix: str = opt("registry-mirror:", "str")


@dataclass
class ClusterConfig:
    # This node's name in locks and logs; empty: <hostname>:<port>.
    node_id: str = opt("", "str")
    # How other nodes reach this one (its internal fill endpoint), e.g. http://10.0.0.1:5000;
    # empty: http://<listen address> (fine when it is not 0.0.0.0).
    advertise_url: str = opt("", "str")
    # Shared secret for the internal /_cluster/ endpoints (only cluster members may call).
    secret: str | None = opt(None, "str", optional=True, secret=True)
    secret_file: Path | None = opt(None, "path", optional=True)
    # A fill lock's lease: renewed by its owner; a dead owner's lock frees after this long.
    fill_lease: float = opt(10.0, "duration")
    # Nodes serving HTTPS with certificates from a private CA: trust this CA bundle (PEM) when
    # streaming from each other; unset: the system's trust store.
    ca_file: Path | None = opt(None, "path", optional=True)


@dataclass
class MetricsConfig:
    # Empty: /metrics is served on the main listener. HOST:PORT: only there instead.
    listen: str = opt("", "str")


@dataclass
class UiConfig:
    """The operator page: at `/ui/` by default; `ui: false` turns it off, `ui: /ops/` moves it."""

    enabled: bool = True
    path: str = "/ui/"


_UI_RESERVED = ("/v2/", "/token/", "/metrics/", "/healthz/", "/readyz/")


def _parse_ui(value: object) -> UiConfig:
    """`true`/`false`, a path such as `/ui/`, or a mapping `{enabled, path}`."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"enabled", "path"}
        if unknown:
            raise ValueError
        ui = UiConfig(
            _parse_bool(value.get("enabled", True)), _parse_str(value.get("path", "/ui/"))
        )
    elif isinstance(value, str) and value.strip().startswith("/"):
        ui = UiConfig(True, value.strip())
    else:
        ui = UiConfig(_parse_bool(value))
    ui.path = "/" + ui.path.strip("/") + "/"
    if ui.path == "//" or not re.fullmatch(r"[A-Za-z0-9/_.-]+", ui.path):
        raise ValueError
    if any((ui.path + "x").startswith(r) or r.startswith(ui.path) for r in _UI_RESERVED):
        raise ValueError  # would shadow the registry API or the operator endpoints
    return ui


_KINDS["ui"] = (
    _parse_ui,
    "true, false, a path such as /ui/, or {enabled: true|false, path: /ui/}"
    " (not under /v2/, /token, /metrics, /healthz or /readyz)",
)


def _ui_field() -> Any:
    return field(
        default_factory=UiConfig, metadata={"kind": "ui", "optional": False, "secret": False}
    )


@dataclass
class Config:
    listen: str = opt("0.0.0.0:5000", "str")
    # Never contact any upstream: serve only what the cache holds (tags whatever their age).
    offline: bool = opt(False, "bool")
    # Processes serving the port together (SO_REUSEPORT); 0 = one per CPU core.
    workers: int = opt(0, "int")
    # On SIGTERM/SIGINT: stop accepting, give responses in flight this long, then exit 0.
    shutdown_timeout: float = opt(30.0, "duration")

    def worker_count(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

    # containerd's ?ns= naming a registry no upstream stands for: refuse (false), or pull
    # from https://<ns> anonymously (true: an open proxy to any registry; think twice).
    allow_any_upstream: bool = opt(False, "bool")

    cache: CacheConfig = field(default_factory=CacheConfig)
    # The default upstream (Docker Hub unless set): names without a registry prefix go here.
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    # More upstreams by name, each with the options of `upstream`; reached by ?ns=<host>
    # or a path prefix /v2/<host or alias>/<repository>/...
    upstreams: dict[str, UpstreamConfig] = field(
        default_factory=dict, metadata={"kind": "upstreams", "optional": False, "secret": False}
    )
    auth: AuthConfig = field(default_factory=AuthConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ui: UiConfig = _ui_field()
    storage: StorageConfig = field(default_factory=StorageConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

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


def _sections(obj: Any) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _set(obj: Any, key: str, f: dataclasses.Field[Any], raw: object) -> None:
    kind = f.metadata["kind"]
    if raw is None:
        if not f.metadata["optional"]:
            raise ConfigError(key, f"expected {_KINDS[kind][1]}, got nothing")
        setattr(obj, f.name, None)
        return
    parser, expected = _KINDS[kind]
    try:
        setattr(obj, f.name, parser(raw))
    except (ValueError, TypeError):
        shown = "***" if f.metadata["secret"] else repr(raw)
        raise ConfigError(key, f"expected {expected}, got {shown}") from None


def _apply_mapping(obj: Any, data: Mapping[str, Any], prefix: str = "") -> None:
    fields = _sections(obj)
    for name, raw in data.items():
        key = f"{prefix}{name}"
        f = fields.get(str(name))
        if f is None:
            known = ", ".join(sorted(fields))
            raise ConfigError(key, f"unknown option (known here: {known})")
        if f.metadata.get("kind") == "upstreams":
            _apply_upstreams(obj, key, raw)
        elif "kind" in f.metadata:
            _set(obj, key, f, raw)
        elif raw is None:
            continue
        elif isinstance(raw, Mapping):
            _apply_mapping(getattr(obj, f.name), raw, f"{key}.")
        else:
            raise ConfigError(key, "expected a section (a mapping of options)")


UPSTREAM_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _apply_upstreams(config: Any, key: str, raw: object) -> None:
    """`upstreams: {name: {url: ..., ...}}`: each entry takes the options of `upstream`."""
    if raw is None:
        return
    if not isinstance(raw, Mapping):
        raise ConfigError(key, "expected a mapping of upstream names to their options")
    for name, options in raw.items():
        name = str(name)
        if not UPSTREAM_NAME_RE.fullmatch(name) or name == "default":
            raise ConfigError(
                f"{key}.{name}",
                "expected a name of lowercase letters, digits, '.', '_' or '-' (not 'default')",
            )
        upstream = config.upstreams.get(name) or UpstreamConfig()
        if options is not None:
            if not isinstance(options, Mapping):
                raise ConfigError(f"{key}.{name}", "expected a section (a mapping of options)")
            _apply_mapping(upstream, options, f"{key}.{name}.")
        config.upstreams[name] = upstream


def _apply_env(obj: Any, env: Mapping[str, str], prefix: str = "") -> None:
    for name, f in _sections(obj).items():
        key = f"{prefix}{name}"
        if f.metadata.get("kind") == "upstreams":
            # Only for upstreams the file names: REGISTRY_MIRROR_UPSTREAMS_<NAME>_<KEY>.
            for upstream_name, upstream in getattr(obj, name).items():
                _apply_env(upstream, env, f"{key}.{upstream_name.replace('-', '_')}.")
            continue
        if "kind" not in f.metadata:
            _apply_env(getattr(obj, name), env, f"{key}.")
            continue
        var = ENV_PREFIX + key.replace(".", "_").upper()
        if var in env:
            _set(obj, f"{key} (from {var})", f, env[var])


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Defaults, then the YAML file, then `REGISTRY_MIRROR_*` variables, then dotted overrides."""
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
        _apply_mapping(config, data)
    env = os.environ if env is None else env
    _apply_env(config, env)
    for key, value in (overrides or {}).items():
        if value is not None:
            *sections, name = key.split(".")
            _apply_mapping(config, _nest(sections, {name: value}))
    validate(config, env)
    return config


def _nest(sections: list[str], leaf: dict[str, object]) -> dict[str, Any]:
    data: dict[str, Any] = leaf
    for section in reversed(sections):
        data = {section: data}
    return data


def _secret_from_file(section: Any, key: str, name: str) -> None:
    """`<name>_file` set: the value is the file's content (stripped)."""
    path = getattr(section, f"{name}_file")
    if path is None:
        return
    try:
        setattr(section, name, path.read_text().strip())
    except OSError as exc:
        raise ConfigError(f"{key}.{name}_file", f"cannot read {path}: {exc.strerror}") from None


def _secrets_from_env(
    section: Any, key: str, names: tuple[str, ...], env: Mapping[str, str]
) -> None:
    """`<name>_env` set: the value is that environment variable's, which must exist."""
    for name in names:
        var = getattr(section, f"{name}_env")
        if var is not None:
            if var not in env:
                raise ConfigError(f"{key}.{name}_env", f"${var} is not set")
            setattr(section, name, env[var])


def _validate_upstream(up: UpstreamConfig, key: str, env: Mapping[str, str]) -> None:
    parts = urlsplit(up.url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{key}.url", f"expected an http(s) URL, got {up.url!r}")
    if up.library_prefix not in {"auto", "true", "false"}:
        raise ConfigError(f"{key}.library_prefix", "expected auto, true or false")
    _secret_from_file(up, key, "password")
    _secrets_from_env(up, key, ("username", "password"), env)
    if (up.username is None) != (up.password is None):
        raise ConfigError(f"{key}.username", "username and password go together")
    if up.ca_file is not None and not up.ca_file.is_file():
        raise ConfigError(f"{key}.ca_file", f"cannot read {up.ca_file}")
    for name in ("tag_ttl", "connect_timeout", "read_timeout"):
        if getattr(up, name) < 0:
            raise ConfigError(f"{key}.{name}", "expected a duration of zero or more")
    if up.retries < 0:
        raise ConfigError(f"{key}.retries", "expected zero or more")
    if up.max_concurrent_fetches < 0:
        raise ConfigError(f"{key}.max_concurrent_fetches", "expected 0 (no limit) or more")


def _validate_front_door(config: Config) -> None:
    auth, tls, limits = config.auth, config.tls, config.limits
    if auth.htpasswd is not None and not auth.htpasswd.is_file():
        raise ConfigError("auth.htpasswd", f"cannot read {auth.htpasswd}")
    if config.access.default not in {"allow", "deny"}:
        raise ConfigError("access.default", "expected allow or deny")
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


def _validate_cluster(config: Config, env: Mapping[str, str]) -> None:
    storage, metadata, cluster = config.storage, config.metadata, config.cluster
    if storage.kind not in {"filesystem", "s3"}:
        raise ConfigError("storage.kind", "expected filesystem or s3")
    if metadata.kind not in {"local", "redis"}:
        raise ConfigError("metadata.kind", "expected local or redis")
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
    _secrets_from_env(s3, "storage.s3", ("access_key", "secret_key"), env)
    _secret_from_file(s3, "storage.s3", "secret_key")
    if metadata.kind == "redis" and urlsplit(metadata.redis_url).scheme not in {
        "redis", "rediss", "unix"
    }:  # fmt: skip
        raise ConfigError("metadata.redis_url", "expected redis://HOST:PORT/DB (or rediss://)")
    _secret_from_file(cluster, "cluster", "secret")
    if cluster.advertise_url and urlsplit(cluster.advertise_url).scheme not in {"http", "https"}:
        raise ConfigError("cluster.advertise_url", "expected an http(s) URL")
    if cluster.ca_file is not None and not cluster.ca_file.is_file():
        raise ConfigError("cluster.ca_file", f"cannot read {cluster.ca_file}")
    if cluster.fill_lease < 1:
        raise ConfigError("cluster.fill_lease", "expected a duration of 1s or more")
    if config.clustered and metadata.kind == "redis" and not cluster.secret:
        raise ConfigError("cluster.secret", "nodes sharing Redis need a shared secret")


def validate(config: Config, env: Mapping[str, str] | None = None) -> None:
    """Cross-field and semantic checks that a type alone cannot express."""
    env = os.environ if env is None else env
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
    _validate_upstream(config.upstream, "upstream", env)
    hosts: dict[str, str] = {}
    for name, upstream in config.upstreams.items():
        key = f"upstreams.{name}"
        _validate_upstream(upstream, key, env)
        for host in [*upstream.registry_names(), *upstream.aliases]:
            if host in hosts:
                raise ConfigError(f"{key}", f"{host!r} also names upstreams.{hosts[host]}")
            if "/" in host or not host:
                raise ConfigError(f"{key}.aliases", f"expected one path segment, got {host!r}")
            hosts[host] = name
    _validate_front_door(config)
    _validate_cluster(config, env)
    if config.log.level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError("log.level", "expected debug, info, warning or error")
    if config.log.format not in {"auto", "json", "console"}:
        raise ConfigError("log.format", "expected auto, json or console")
