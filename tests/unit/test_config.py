from __future__ import annotations

import dataclasses
import importlib.util
import operator
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import yaml

from mirror.config import (
    Config,
    ConfigError,
    load_config,
    parse_duration,
    parse_size,
    resolve_secrets,
)


def test_units() -> None:
    assert parse_size("4MiB") == 4 * 1024**2
    assert parse_size("50GiB") == 50 * 1024**3
    assert parse_size("10G") == 10 * 1000**3
    assert parse_size(123) == 123
    assert parse_duration("10m") == 600
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    assert parse_duration(45) == 45
    for bad in ["", "10x", "m10", "ten"]:
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_defaults_point_at_docker_hub() -> None:
    config = load_config(None, env={})
    assert config.upstream.url == "https://registry-1.docker.io"
    assert config.upstream.uses_library_prefix()
    assert config.upstream.tag_ttl == 600
    assert config.listen_address() == ("0.0.0.0", 5000)


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    conf = tmp_path / "mirror.yaml"
    conf.write_text("upstream:\n  url: http://127.0.0.1:1\n  tag_ttl: 1m\nlisten: 127.0.0.1:7000\n")
    config = load_config(
        conf,
        env={"REGISTRY_MIRROR_UPSTREAM_TAG_TTL": "2m", "REGISTRY_MIRROR_LISTEN": "[::1]:7001"},
        overrides={"upstream.tag_ttl": "3m", "cache.dir": str(tmp_path)},
    )
    assert config.upstream.url == "http://127.0.0.1:1"
    assert config.upstream.tag_ttl == 180
    assert config.listen_address() == ("::1", 7001)
    assert not config.upstream.uses_library_prefix()


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("upstream:\n  tag_tll: 1m\n", "upstream.tag_tll"),
        ("upstream:\n  tag_ttl: soon\n", "upstream.tag_ttl"),
        ("upstream:\n  retries: many\n", "upstream.retries"),
        ("upstream:\n  url: ftp://x\n", "upstream.url"),
        ("upstream: 5\n", "upstream"),
        ("listen: nowhere\n", "listen"),
        ("log:\n  level: loud\n", "log.level"),
        ("log:\n  format: xml\n", "log.format"),
        ("upstream:\n  library_prefix: maybe\n", "upstream.library_prefix"),
        ("storage:\n  kind: nfs\n", "storage.kind"),
        ("metadata:\n  kind: etcd\n", "metadata.kind"),
        ("upstream:\n  username: bob\n", "upstream.username"),
        ("upstream:\n  password_file: /nonexistent/pw\n", "upstream.password_file"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    conf = tmp_path / "mirror.yaml"
    conf.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(conf, env={})
    assert err.value.key == key
    assert "\n" not in str(err.value)


def test_secrets_never_show(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret-value\n")
    config = load_config(
        None,
        env={"REGISTRY_MIRROR_UPSTREAM_USERNAME": "bob"},
        overrides={"upstream.password_file": str(pw)},
    )
    assert config.upstream.password == "s3cret-value"
    assert "s3cret" not in repr(config)


SHIPPED = Path(__file__).parents[2] / "conf" / "mirror.yaml"


def test_shipped_config_documents_every_option_with_its_default() -> None:
    assert load_config(SHIPPED, env={}) == load_config(None, env={})
    shipped = yaml.safe_load(SHIPPED.read_text())

    def keys(obj: object, prefix: str = "") -> set[str]:
        out = set()
        assert dataclasses.is_dataclass(obj)
        for f in dataclasses.fields(obj):
            if "kind" in f.metadata:
                out.add(prefix + f.name)
            else:
                out |= keys(getattr(obj, f.name), f"{prefix}{f.name}.")
        return out

    def present(key: str) -> bool:
        node = shipped
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = sorted(k for k in keys(Config()) if not present(k))
    assert missing == [], f"conf/mirror.yaml does not document {missing}"


def test_cache_budget_as_size_or_share_of_the_disk() -> None:
    config = load_config(None, env={"REGISTRY_MIRROR_CACHE_MAX_SIZE": "80%"})
    assert config.cache.budget_bytes(1000) == 800
    config = load_config(None, env={"REGISTRY_MIRROR_CACHE_MAX_SIZE": "2KiB"})
    assert config.cache.budget_bytes(10**12) == 2048
    with pytest.raises(ConfigError):
        load_config(None, env={"REGISTRY_MIRROR_CACHE_MAX_SIZE": "150%"})
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"REGISTRY_MIRROR_CACHE_LOW_WATERMARK": "0.99"})
    assert err.value.key == "cache.low_watermark"


def test_registry_names_for_containerd_ns() -> None:
    hub = load_config(None, env={})
    assert "docker.io" in hub.upstream.registry_names()
    quay = load_config(None, env={"REGISTRY_MIRROR_UPSTREAM_URL": "https://quay.io"})
    assert quay.upstream.registry_names() == {"quay.io"}
    lab = load_config(
        None,
        env={
            "REGISTRY_MIRROR_UPSTREAM_URL": "http://127.0.0.1:5000",
            "REGISTRY_MIRROR_UPSTREAM_NAMES": "docker.io, registry.lab",
        },
    )
    assert lab.upstream.registry_names() == {"docker.io", "registry.lab"}


def test_named_upstreams_with_credentials_from_env_and_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    conf = tmp_path / "mirror.yaml"
    conf.write_text(
        "upstreams:\n"
        "  ghcr:\n    url: https://ghcr.io\n    username: me\n    password_env: GHCR_TOKEN\n"
        f"  quay:\n    url: https://quay.io\n    username: me\n    password_file: {tmp_path}/pw\n"
        "    tag_ttl: 1h\n"
    )
    config = load_config(
        conf, env={"GHCR_TOKEN": "from-env", "REGISTRY_MIRROR_UPSTREAMS_QUAY_RETRIES": "7"}
    )
    assert config.upstreams["ghcr"].password == "from-env"
    assert config.upstreams["quay"].password == "from-file"
    assert config.upstreams["quay"].tag_ttl == 3600 and config.upstreams["quay"].retries == 7
    assert "from-env" not in repr(config) and "from-file" not in repr(config)


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("upstreams:\n  Bad Name:\n    url: https://x.io\n", "upstreams.Bad Name"),
        ("upstreams:\n  default:\n    url: https://x.io\n", "upstreams.default"),
        ("upstreams:\n  a:\n    url: ftp://x\n", "upstreams.a.url"),
        ("upstreams:\n  a:\n    tag_tll: 1m\n", "upstreams.a.tag_tll"),
        ("upstreams:\n  a:\n    username: u\n    password_env: NOPE_NOT_SET\n",
         "upstreams.a.password_env"),
        ("upstreams:\n  a: {url: 'https://x.io'}\n  b: {url: 'https://x.io'}\n", "upstreams.b"),
        ("auth:\n  htpasswd: /nonexistent/htpasswd\n", "auth.htpasswd"),
        ("access:\n  rules: [{who: [x], action: maybe}]\n", "access.rules"),
        ("access:\n  default: perhaps\n", "access.default"),
        ("tls:\n  cert: /nonexistent.pem\n", "tls.cert"),
        ("limits:\n  client_rate: fast\n", "limits.client_rate"),
    ],
)  # fmt: skip
def test_front_door_config_errors_name_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    conf = tmp_path / "mirror.yaml"
    conf.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(conf, env={})
    assert err.value.key == key
    assert "\n" not in str(err.value)


def test_four_upstreams_example_is_valid(tmp_path: Path) -> None:
    """conf/upstreams.yaml, with its secrets and files supplied as an operator would."""
    files = {}
    for key in ("auth.htpasswd", "upstreams.vendor.password_file", "upstreams.vendor.ca_file",
                "tls.cert", "tls.key"):  # fmt: skip
        files[key] = tmp_path / key
        files[key].write_text("x\n")
    env = {"DOCKERHUB_USER": "u", "DOCKERHUB_TOKEN": "t", "GHCR_USER": "g", "GHCR_TOKEN": "t"}
    env["DOCKERHUB_CI_TOKEN"] = "c"
    config = load_config(SHIPPED.parent / "upstreams.yaml", env=env, overrides=files)
    assert config.upstream.accounts() == [("u", "t"), ("ci-bot", "c")]
    assert sorted(config.upstreams) == ["ghcr", "k8s", "quay", "vendor"]
    assert config.upstreams["ghcr"].password == "t" and config.upstreams["vendor"].has_credentials
    assert [r.action for r in config.access.rules] == ["allow", "deny"]


def test_choices_are_their_literal_values_whatever_the_case() -> None:
    config = load_config(
        None, env={"REGISTRY_MIRROR_LOG_LEVEL": "WARNING", "REGISTRY_MIRROR_ACCESS_DEFAULT": "Deny"}
    )
    assert config.log.level == "warning" and config.access.default == "deny"
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"REGISTRY_MIRROR_LOG_LEVEL": "loud"})
    assert str(err.value) == (
        "config error: log.level (from REGISTRY_MIRROR_LOG_LEVEL):"
        " expected debug, info, warning or error, got 'loud'"
    )


def test_loaded_config_is_frozen() -> None:
    """Nothing changes an option under the components that read it: a test or a command that
    wants another value builds another config."""
    config = load_config(
        None, env={}, overrides={"upstreams": {"quay": {"url": "https://quay.io"}}}
    )
    for section, name in ((config.upstream, "url"), (config, "listen"), (config.ui, "path")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, name, "x")
    with pytest.raises(TypeError):
        operator.setitem(config.upstreams, "ghcr", config.upstream)
    assert isinstance(config.cache.pins, tuple) and isinstance(config.auth.admins, tuple)


def test_secrets_are_resolved_in_one_place_without_changing_the_input(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("cluster-secret\n")
    raw = dataclasses.replace(
        Config(),
        upstream=dataclasses.replace(Config().upstream, username="me", password_env="HUB_TOKEN"),
        cluster=dataclasses.replace(Config().cluster, secret_file=tmp_path / "secret"),
    )
    resolved = resolve_secrets(raw, {"HUB_TOKEN": "t0ken"})
    assert resolved.upstream.password == "t0ken" and resolved.cluster.secret == "cluster-secret"
    assert raw.upstream.password is None and raw.cluster.secret is None


def test_misspelt_environment_variable_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"REGISTRY_MIRROR_UPSTRAEM_URL": "https://quay.io"})
    assert err.value.key == "REGISTRY_MIRROR_UPSTRAEM_URL"
    assert "did you mean REGISTRY_MIRROR_UPSTREAM_URL?" in str(err.value)
    assert "\n" not in str(err.value)
    # An upstream's variables exist only for upstreams the file names.
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"REGISTRY_MIRROR_UPSTREAMS_QUAY_RETRIES": "7"})
    assert err.value.key == "REGISTRY_MIRROR_UPSTREAMS_QUAY_RETRIES"
    # Those the project sets itself (workers.py's supervisor, the test fixtures) are options;
    # other variables, and ours named by a `*_env` option, are not the loader's business.
    config = load_config(
        None,
        env={
            "REGISTRY_MIRROR_WORKERS": "1",
            "REGISTRY_MIRROR_LOG_FORMAT": "json",
            "REGISTRY_MIRROR_UPSTREAM_USERNAME": "me",
            "REGISTRY_MIRROR_UPSTREAM_PASSWORD_ENV": "REGISTRY_MIRROR_TOKEN",
            "REGISTRY_MIRROR_TOKEN": "t0ken",
            "REGISTRY_MIRRORS": "elsewhere",
            "PATH": "/usr/bin",
        },
    )
    assert config.workers == 1 and config.upstream.password == "t0ken"


@pytest.mark.parametrize(
    ("settings", "key", "module"),
    [
        ({"storage.kind": "s3"}, "storage.kind", "aiobotocore"),
        ({"metadata.kind": "redis", "cluster.secret": "s"}, "metadata.kind", "redis"),
    ],
)
def test_cluster_option_without_the_cluster_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, object], key: str, module: str
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == module else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    load_config(None, env={})  # a single node needs neither
    with pytest.raises(ConfigError) as err:
        load_config(None, env={}, overrides=settings)
    assert err.value.key == key
    assert str(err.value) == (
        f"config error: {key}: {settings[key]} needs the {module} package:"
        " pip install 'registry-mirror[cluster]'"
    )
