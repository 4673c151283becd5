"""Scale-out benchmark: 3 nodes vs 1 on the same machine, same run.

Usage: .venv/bin/python benchmarks/cluster.py [--smoke] [--out DIR] [--publish [DIR]]
(after `bash benchmarks/run`'s set-up, or `bash tests/run`, has installed redis-server, weed and
the package into .venv). Writes cluster.json to --out (benchmarks/out/, which git ignores);
--publish copies it into benchmarks/results/, the figures the README shows.

Starts on loopback: the upstream (Debian's docker-registry), redis-server, SeaweedFS
(`weed server -s3`), and registry-mirror nodes in cluster mode, each node one process. Then:

- warm hits: many curl clients downloading a blob every node holds, spread over 1 node, then
  over 3 nodes; aggregate MB/s and the ratio 3 nodes / 1 node;
- cold fan-out: 30 clients spread over 3 nodes on one cold blob through a shared WAN-like
  link (100 MB/s), against one client alone on one node: the time ratio and the number of
  copies the upstream served (the target is one per cluster). The curl processes are started
  first and let go together (runner.curls_together), so their start-up is not counted.

On this benchmark machine every process shares the same 2 cores, so 3 nodes cannot add CPU:
the warm ratio says what the cluster machinery costs, not what 3 machines would give.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from runner import MiB, NoTokens, Proc, curl_get, curls_together, wait_http  # noqa: E402

from benchmarks.output import add_arguments, progress, publish  # noqa: E402
from tests.fixtures.distribution import Registry  # noqa: E402
from tests.fixtures.mirror_server import free_port  # noqa: E402
from tests.fixtures.redis_server import RedisServer  # noqa: E402
from tests.fixtures.seaweed import SeaweedS3  # noqa: E402
from tests.fixtures.synthetic_images import Builder, Pusher  # noqa: E402
from tests.fixtures.throttle import Throttle  # noqa: E402


def start_nodes(
    work: Path, name: str, n: int, upstream: str, redis: RedisServer, s3: SeaweedS3
) -> tuple[list[Proc], list[str]]:
    prefix = f"{name}-{secrets.token_hex(3)}/"
    config = s3.s3_config(prefix)
    procs, urls = [], []
    for i in range(n):
        port = free_port()
        settings = {
            "listen": f"127.0.0.1:{port}",
            "workers": 1,
            "cache": {"dir": str(work / f"{name}-node{i}")},
            "upstream": {"url": upstream},
            "log": {"level": "warning"},
            "storage": {
                "kind": "s3",
                "s3": {
                    "endpoint": config.endpoint,
                    "bucket": config.bucket,
                    "prefix": prefix,
                    "access_key": config.access_key,
                    "secret_key": config.secret_key,
                },
            },
            "metadata": {"kind": "redis", "redis_url": redis.url, "key_prefix": prefix},
            "cluster": {"secret": "bench-secret"},
        }
        path = work / f"{name}-node{i}.yaml"
        path.write_text(yaml.safe_dump(settings))
        cmd = [sys.executable, "-m", "mirror", "serve", "--config", str(path)]
        procs.append(Proc(f"{name}{i}", cmd, work / f"{name}-node{i}.log"))
        urls.append(f"http://127.0.0.1:{port}")
    return procs, urls


async def aggregate_throughput(urls: list[str], clients: int, rounds: int, size: int) -> float:
    """Bytes/s with `clients` curl processes, each downloading `rounds` times, spread over
    `urls` round-robin."""

    async def client(i: int) -> None:
        for _ in range(rounds):
            await curl_get(urls[i % len(urls)])

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return clients * rounds * size / (time.perf_counter() - start)


async def run(smoke: bool, work: Path) -> dict[str, object]:
    blob_size = 4 * MiB if smoke else 64 * MiB
    clients, rounds = (4, 1) if smoke else (12, 3)
    fan_clients = 6 if smoke else 30
    link = 50e6 if smoke else 100e6
    procs: list[Proc] = []
    (work / "s3").mkdir()
    redis = RedisServer(work / "redis")
    s3 = SeaweedS3(work / "s3")
    (work / "upstream").mkdir()
    upstream = Registry(work / "upstream", None)
    try:
        redis.start()
        s3.start()
        upstream.start()
        builder = Builder(work / "images")
        warm = builder.image("bench/warm", "1", [blob_size], oci=True)
        cold = builder.image("bench/cold", "1", [blob_size], oci=True)
        cold1 = builder.image("bench/cold1", "1", [blob_size + 1], oci=True)
        pusher = Pusher(upstream.url, NoTokens())  # type: ignore[arg-type]  # no token server: the upstream checks none
        for image in (warm, cold, cold1):
            pusher.push(image)
        pusher.close()
        progress("upstream, redis and S3 up, 3 images pushed")
        result: dict[str, object] = {"blob_bytes": blob_size}

        # Warm hits: 1 node, then 3 nodes (each node warmed once first).
        warm_blob = warm.layers()[0]
        warm_path = f"/v2/{warm.repo}/blobs/{warm_blob.digest}"
        for n in (1, 3):
            nodes, urls = start_nodes(work, f"warm{n}", n, upstream.url, redis, s3)
            procs.extend(nodes)
            for url in urls:
                await wait_http(f"{url}/v2/")
                await curl_get(url + warm_path)
            rate = await aggregate_throughput(
                [u + warm_path for u in urls], clients, rounds, warm_blob.size
            )
            result[f"warm_{n}_node_MBps"] = round(rate / 1e6, 1)
            progress(f"warm hits on {n} node{'s' if n > 1 else ''}: {rate / 1e6:.1f} MB/s")
            for proc in nodes:
                proc.stop()
        result["warm_ratio_3_vs_1"] = round(
            float(result["warm_3_node_MBps"]) / float(result["warm_1_node_MBps"]),
            2,  # type: ignore[arg-type]
        )

        # Cold fan-out through a shared WAN-like link: 1 client on 1 node, then many on 3.
        times = {}
        for name, image, n, count in (("one", cold1, 1, 1), ("fan", cold, 3, fan_clients)):
            throttle = Throttle(upstream.port, link)
            await throttle.start()
            nodes, urls = start_nodes(
                work, f"cold-{name}", n, f"http://127.0.0.1:{throttle.port}", redis, s3
            )
            procs.extend(nodes)
            try:
                for url in urls:
                    await wait_http(f"{url}/v2/")
                blob = image.layers()[0]
                path = f"/v2/{image.repo}/blobs/{blob.digest}"
                before = upstream.blob_gets(blob.digest)
                times[name] = await curls_together([urls[i % n] + path for i in range(count)])
                progress(f"cold, {count} client{'s' if count > 1 else ''} on {n} node"
                         f"{'s' if n > 1 else ''}: {times[name]:.2f}s")  # fmt: skip
                await asyncio.sleep(1.0)
                if name == "fan":
                    result["fan_upstream_copies"] = upstream.blob_gets(blob.digest) - before
            finally:
                for proc in nodes:
                    proc.stop()
                await throttle.close()
        result["fan_clients"] = fan_clients
        result["fan_one_client_s"] = round(times["one"], 2)
        result["fan_all_clients_s"] = round(times["fan"], 2)
        result["fan_ratio"] = round(times["fan"] / times["one"], 2)
    finally:
        for proc in procs:
            proc.stop()
        upstream.stop()
        s3.stop()
        redis.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    add_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirror-cluster-bench-") as tmp:
        result = asyncio.run(run(args.smoke, Path(tmp)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster.json").write_text(json.dumps(result, indent=1) + "\n")
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:{width}}  {value}")
    progress(f"wrote cluster.json into {args.out}")
    publish(args.out, args.publish, ["cluster.json"])
    copies = result.get("fan_upstream_copies")
    return 0 if copies == 1 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
