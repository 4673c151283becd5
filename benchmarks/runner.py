"""registry-mirror side by side with the reference pull-through cache and nginx, same machine.

Usage: bash benchmarks/run [--smoke] [--out DIR] [--publish [DIR]]
                          [--soak-seconds S] [--soak-clients N] [--profile-soak [FORMAT]]

On loopback it starts: a real upstream (Debian's docker-registry, distribution v2.8), the
reference pull-through cache (the same docker-registry with `proxy: remoteurl:`), nginx serving
the same blob file with sendfile, and registry-mirror with its default settings. It loads the
same synthetic images into the upstream, runs every scenario against both caches, prints a
table, and writes results.json and results.png (matplotlib) to --out (benchmarks/out/, which
git ignores); --publish copies them into benchmarks/results/, the figures the README shows. A
progress line is printed (and flushed) as each measurement ends.

Scenario 8, the soak (benchmarks/soak.py), has --soak-clients clients pull whole images from
each cache, cold at the start, for --soak-seconds; --profile-soak records a mirror worker with
py-spy meanwhile.

Scenario 3 puts a throttle between each cache and the upstream that shares one link rate
across all connections (a branch office's WAN), so that single flight shows as users feel it;
its clients are let go together (`curls_together`).

benchmarks/followers.py (run on its own) measures a second client on a cold blob served by the
worker that fills it or by the other one.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import soak  # noqa: E402
from benchmarks.output import add_arguments, progress, publish  # noqa: E402
from tests.fixtures.distribution import Registry  # noqa: E402
from tests.fixtures.mirror_server import free_port  # noqa: E402
from tests.fixtures.synthetic_images import Builder, Image, Pusher  # noqa: E402
from tests.fixtures.throttle import Throttle  # noqa: E402

MiB = 1024 * 1024
VERIFYING_RELAY = "relay, digest checked"
PLAIN_RELAY = "relay, unchecked"
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


@dataclass
class Sizes:
    big: int
    fanout: int
    link_rate: float  # bytes/s shared by all connections through the throttle
    wrk_seconds: int
    pulls: int
    layers: list[int] = field(default_factory=list)


FULL = Sizes(512 * MiB, 64 * MiB, 100e6, 10, 50, [4 * MiB, 8 * MiB, 16 * MiB, 2 * MiB])
SMOKE = Sizes(4 * MiB, 2 * MiB, 50e6, 1, 5, [256 * 1024, 128 * 1024])


class NoTokens:
    """The benchmark upstream runs without auth: the pusher's token is never checked."""

    def issue(self, user: str | None, scopes: list[str]) -> str:
        return "unused"


# -- processes ------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    def pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.popen.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        return [self.popen.pid, *map(int, out)]

    def peak_rss(self) -> int:
        """The largest VmHWM among the process and its children (workers)."""
        peak = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                continue
        return peak

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)


async def wait_http(url: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {limit}s")


def reference_proxy(work: Path, upstream: str) -> tuple[Proc, str]:
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(work / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
        "proxy": {"remoteurl": upstream},
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yml").write_text(yaml.safe_dump(config))
    binary = shutil.which("docker-registry") or "docker-registry"
    proc = Proc("reference", [binary, "serve", str(work / "config.yml")], work / "log")
    return proc, f"http://127.0.0.1:{port}"


def mirror(
    work: Path, upstream: str, *, outrun_disk: bool = True, args: tuple[str, ...] = ()
) -> tuple[Proc, str]:
    """registry-mirror with its defaults but one: `cache.outrun_disk`, the setting for an
    upstream on a fast local network (as this loopback one is), so a client faster than the
    disk is not held to it (it changes nothing where the disk keeps up: 2b, 3 and the soak).
    `args` go after the runner's (a later `--log-level` wins); its log is `work / "log"`."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "mirror", "serve",
        "--listen", f"127.0.0.1:{port}", "--cache-dir", str(work / "cache"),
        "--upstream", upstream, "--log-level", "warning", *args,
    ]  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    env = {"REGISTRY_MIRROR_CACHE_OUTRUN_DISK": str(outrun_disk).lower()}
    return Proc("mirror", cmd, work / "log", env), f"http://127.0.0.1:{port}"


def relay(work: Path, upstream: str, *, verify: bool) -> tuple[Proc, str]:
    """benchmarks/relay.py: the least a storing cache does on a cold blob, with or without the
    mirror's digest check, so the run shows what the check itself costs here."""
    port = free_port()
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "relay.py"), "--port", str(port),
        "--upstream", upstream, "--dir", str(work / "blobs"),
        *(() if verify else ("--no-verify",)),
    ]  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    return Proc("relay", cmd, work / "log"), f"http://127.0.0.1:{port}"


def _nginx(work: Path, server: str, http_extra: str = "") -> tuple[Proc, str]:
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    user = "user root; " if os.geteuid() == 0 else ""  # workers write the proxy's cache
    conf = work / "nginx.conf"
    conf.write_text(
        f"{user}daemon off; worker_processes auto; pid {work}/nginx.pid;\n"
        f"error_log {work}/error.log; events {{ worker_connections 1024; }}\n"
        "http { access_log off; sendfile on; tcp_nopush on;\n"
        f"  client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};\n"
        f"  uwsgi_temp_path {work}; scgi_temp_path {work}; {http_extra}\n"
        f"  server {{ listen 127.0.0.1:{port}; {server} }} }}\n"
    )
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    cmd = [binary, "-c", str(conf), "-e", str(work / "error.log")]
    return Proc("nginx", cmd, work / "log"), f"http://127.0.0.1:{port}"


def nginx(work: Path, blob: Path) -> tuple[Proc, str]:
    """nginx serving the blob file with sendfile: the practical limit for bytes from disk."""
    proc, url = _nginx(work, f"location /blob {{ alias {blob}; }}")
    return proc, f"{url}/blob"


def nginx_proxy(work: Path, upstream: str, *, cache: bool) -> tuple[Proc, str]:
    """nginx in front of the upstream: with `cache` a caching proxy that writes each blob to
    disk (proxy_cache, no digest check), without it a plain proxy (no disk, no digest check).
    What a cold fill costs beyond the bytes' own copies, in C, on this machine."""
    location = f"proxy_pass {upstream}; proxy_http_version 1.1; "
    extra = ""
    if cache:
        extra = f"proxy_cache_path {work}/cache keys_zone=blobs:10m max_size=8g use_temp_path=off;"
        location += "proxy_cache blobs; proxy_cache_valid 200 1h;"
    return _nginx(work, f"location / {{ {location} }}", extra)


# -- the WAN-like throttle -----------------------------------------------------------------


# -- clients --------------------------------------------------------------------------------


async def get_all(session: aiohttp.ClientSession, url: str) -> int:
    n = 0
    async with session.get(url, headers={"Accept": ACCEPT}) as r:
        if r.status != 200:
            raise RuntimeError(f"GET {url}: {r.status}")
        async for chunk in r.content.iter_chunked(1 << 20):
            n += len(chunk)
    return n


async def curl_get(url: str) -> None:
    """One download by a curl process: many of them do not share this process's one core."""
    proc = await asyncio.create_subprocess_exec("curl", "-sf", "-o", "/dev/null", url)
    if await proc.wait() != 0:
        raise RuntimeError(f"curl {url} failed")


async def curls_together(urls: list[str], settle: float = 0.3) -> float:
    """Seconds from letting go of one curl process per URL, started beforehand and each
    waiting for its URL on stdin (`-K -`), until the last one finished. Started one after
    another from this loop, 20 of them took 0.11-0.12 s just to exist (measured with a
    refused port), which a fan-out's time then counted as the cache's; let go together, the
    20 were done in 0.02 s."""
    procs: list[asyncio.subprocess.Process] = []
    try:
        for _ in urls:
            procs.append(
                await asyncio.create_subprocess_exec(
                    "curl", "-sf", "-o", "/dev/null", "-K", "-", stdin=asyncio.subprocess.PIPE
                )
            )  # fmt: skip
        await asyncio.sleep(settle)  # each is up and blocked reading its stdin
        start = time.perf_counter()
        for proc, url in zip(procs, urls, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(f'url = "{url}"\n'.encode())
            proc.stdin.close()
    finally:  # (on a failure, an empty config ends the ones left waiting)
        for proc in procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
    codes = await asyncio.gather(*(proc.wait() for proc in procs))
    elapsed = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"curl failed: exit codes {codes}")
    return elapsed


async def curl_once(url: str) -> tuple[float, float]:
    """(bytes/s, bytes) of one download by curl (a C client, so the client is not the
    bottleneck). Run from a thread: the throttle lives on this event loop."""
    out = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sf", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}", url],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    speed, size = map(float, out.stdout.split())
    return speed, size


async def curl_speed(url: str, runs: int = 3) -> float:
    """Best of `runs` downloads by curl."""
    return max([(await curl_once(url))[0] for _ in range(runs)])


async def settled() -> None:
    """Let the caches finish storing (the reference proxy stores in the background) and the
    kernel write back what they wrote, so one measurement does not pay for another's disk."""
    await asyncio.sleep(1)
    await asyncio.to_thread(os.sync)


async def upstream_quiet(upstream: Registry, digest: str, limit: float = 60) -> None:
    """Wait until the upstream's count of GETs of `digest` stops changing: the registry logs
    a GET when it ends, and the reference proxy fetches a second copy in the background."""
    deadline = time.monotonic() + limit
    count = upstream.blob_gets(digest)
    while time.monotonic() < deadline:
        await asyncio.sleep(1.5)
        count, before = upstream.blob_gets(digest), count
        if count == before:
            return


async def measured_get(upstream: Registry, url: str) -> tuple[float, float]:
    """(bytes/s, CPU seconds per byte of the upstream and curl together) for one download."""
    before_up = process_cpu(upstream_pid(upstream))
    before_curl = resource.getrusage(resource.RUSAGE_CHILDREN)
    speed, size = await curl_once(url)
    after_curl = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = process_cpu(upstream_pid(upstream)) - before_up
    used += after_curl.ru_utime + after_curl.ru_stime
    used -= before_curl.ru_utime + before_curl.ru_stime
    return speed, used / size


def upstream_pid(upstream: Registry) -> int:
    assert upstream.proc is not None, "the upstream is not running"
    return upstream.proc.pid


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sha256_speed(seconds: float = 0.5) -> float:
    """Bytes/s one core hashes with SHA-256 (what verifying every byte costs at least)."""
    chunk = os.urandom(1 << 20)
    digest = hashlib.sha256()
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        digest.update(chunk)
        done += len(chunk)
    return done / (time.perf_counter() - start)


def page_cache_write_speed(path: Path, size: int) -> float:
    """Bytes/s of writing `size` bytes into a new file (no fsync), after the cold GETs: what
    storing a blob costs here before any disk is involved. The file is kept, as the caches
    keep theirs, so the kernel must find new pages for it."""
    chunk = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(size // len(chunk)):
            os.write(fd, chunk)
        return size // len(chunk) * len(chunk) / (time.perf_counter() - start)
    finally:
        os.close(fd)


def cold_ceiling(direct_cpu_per_byte: float) -> float:
    """Bytes/s no verifying cache can beat here. The direct GET's CPU per byte (the upstream's
    send and curl's receive, measured) is what one loopback hop costs; through a cache each
    byte takes two hops (upstream to cache, cache to client) and one SHA-256 pass, and all
    of it shares the machine's cores. Writing the blob and the cache's own work are left out,
    so the real limit is lower."""
    cores = len(os.sched_getaffinity(0))
    return cores / (2 * direct_cpu_per_byte + 1 / sha256_speed())


def wrk(url: str, seconds: int, connections: int = 32) -> tuple[float, float]:
    """(requests/s, p99 latency in ms) by wrk."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-H", f"Accept: {ACCEPT}", url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} errors from {url}")
    return rps, float(p99.group(1)) * scale


async def pull_image(session: aiohttp.ClientSession, base: str, image: Image) -> None:
    await get_all(session, f"{base}/v2/{image.repo}/manifests/{image.tag}")
    for blob in image.blobs:
        await get_all(session, f"{base}/v2/{image.repo}/blobs/{blob.digest}")


async def many_pulls(base: str, image: Image, clients: int) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as s:
        start = time.perf_counter()
        await asyncio.gather(*(pull_image(s, base, image) for _ in range(clients)))
        return time.perf_counter() - start


# -- the run --------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    unit: str
    baseline_name: str
    baseline: float | None
    reference: float | None
    mirror: float
    ratio: float | None  # mirror vs what the target compares with
    target: str
    met: bool | None


async def run(sizes: Sizes, out: Path, work: Path, soaking: soak.Settings) -> list[Row]:
    rows: list[Row] = []
    procs: list[Proc] = []

    def add(row: Row) -> None:
        rows.append(row)
        met = {True: "met", False: "MISSED", None: ""}[row.met]
        ref = f", reference {row.reference:.1f}" if row.reference is not None else ""
        base = f", {row.baseline_name} {row.baseline:.1f}" if row.baseline is not None else ""
        progress(f"{row.scenario}: mirror {row.mirror:.1f} {row.unit}{ref}{base} {met}".rstrip())

    def started(pair: tuple[Proc, str]) -> tuple[Proc, str]:
        procs.append(pair[0])
        return pair

    try:
        (work / "upstream").mkdir(parents=True)
        upstream = Registry(work / "upstream", None)
        upstream.start()
        builder = Builder(work / "images")
        bigs = [builder.image(f"bench/big{i}", "1", [sizes.big], oci=True) for i in range(3)]
        big = bigs[0]
        fan = builder.image("bench/fanout", "1", [sizes.fanout], oci=True)
        app = builder.image("bench/app", "1", sizes.layers, oci=True)
        pusher = Pusher(upstream.url, NoTokens())  # type: ignore[arg-type]  # no token server: the upstream checks none
        for image in (*bigs, fan, app):
            pusher.push(image)
        pusher.close()
        progress(f"upstream up, {len(bigs) + 2} images pushed")
        big_blob = big.layers()[0]

        ref, ref_url = started(reference_proxy(work / "reference", upstream.url))
        mir, mir_url = started(mirror(work / "mirror", upstream.url))
        ngx, ngx_url = started(nginx(work / "nginx", big_blob.path))
        for url in (f"{ref_url}/v2/", f"{mir_url}/v2/", ngx_url):
            await wait_http(url)

        # 2. cold GET of a big blob (the first fetch through each cache), best of the big
        # blobs, each cold once for each cache; nginx's plain and caching proxies beside them
        # show what a cold pass costs on this machine, and `cold_ceiling` what is reachable.
        # The relays (benchmarks/relay.py) show the same for the least a storing cache does,
        # with and without the digest check.
        ngx_plain, plain_url = started(nginx_proxy(work / "nginx-proxy", upstream.url, cache=False))
        ngx_cache, cache_url = started(nginx_proxy(work / "nginx-cache", upstream.url, cache=True))
        checked, checked_url = started(relay(work / "relay", upstream.url, verify=True))
        unchecked, unchecked_url = started(relay(work / "relay-nv", upstream.url, verify=False))
        for url in (plain_url, cache_url, checked_url, unchecked_url):
            await wait_http(f"{url}/v2/")
        cold: dict[str, float] = {}
        direct_cpu = 0.0
        caches = [
            ("reference", ref_url), ("mirror", mir_url),
            ("nginx proxy_cache", cache_url), ("nginx proxy", plain_url),
            (VERIFYING_RELAY, checked_url), (PLAIN_RELAY, unchecked_url),
        ]  # fmt: skip
        copies: dict[str, float] = {}  # upstream bytes of a cold blob / its size, per cache
        await settled()
        for turn, image in enumerate(bigs):
            digest = image.layers()[0].digest
            path = f"/v2/{image.repo}/blobs/{digest}"
            speed, cpu = await measured_get(upstream, upstream.url + path)
            if speed > cold.get("direct", 0.0):
                cold["direct"], direct_cpu = speed, cpu
            for name, base in caches[turn:] + caches[:turn]:  # a new first each blob
                cold[name] = max(cold.get(name, 0.0), await curl_speed(base + path, runs=1))
                # No fill's storing (the reference's second copy, the mirror's rest of a file
                # its client outran) or writeback in the next one's time.
                await upstream_quiet(upstream, digest)
                await settled()
            by_agent = upstream.blob_bytes_by(digest)
            # nginx passes curl's User-Agent on: curl's GETs are the direct one, the plain
            # proxy's one and the caching proxy's.
            for name, fetched in (
                ("reference", by_agent.get("Go-http-client/1.1", 0)),
                ("mirror", by_agent.get("registry-mirror", 0)),
                ("nginx proxy_cache", sum(n for a, n in by_agent.items() if "curl" in a)),
            ):
                if name == "nginx proxy_cache":
                    fetched -= 2 * sizes.big
                copies[name] = max(copies.get(name, 0.0), round(fetched / sizes.big, 2))
        ceiling = cold_ceiling(direct_cpu)
        page_cache = await asyncio.to_thread(page_cache_write_speed, work / "written", sizes.big)
        direct, ref_cold, mir_cold = cold["direct"], cold["reference"], cold["mirror"]
        add(
            Row(
                "2. cold GET big blob",
                "MB/s",
                "direct upstream",
                direct / 1e6,
                ref_cold / 1e6,
                mir_cold / 1e6,
                mir_cold / direct,
                ">= 0.8 x direct",
                mir_cold >= 0.8 * direct,
            )
        )
        add(
            Row(
                "2. cold GET vs the reference",
                "MB/s",
                "",
                None,
                ref_cold / 1e6,
                mir_cold / 1e6,
                mir_cold / ref_cold,
                ">= 1.0 x reference (issue 20)",
                mir_cold >= ref_cold,
            )
        )
        for name in ("nginx proxy_cache", "nginx proxy", VERIFYING_RELAY, PLAIN_RELAY):
            add(
                Row(
                    f"2. cold GET beside {name}",
                    "MB/s",
                    name,
                    cold[name] / 1e6,
                    ref_cold / 1e6,
                    mir_cold / 1e6,
                    mir_cold / cold[name],
                    f"context: {cold[name] / direct:.2f} x direct, "
                    f"{cold[name] / ref_cold:.2f} x reference",
                    None,
                )
            )
        add(
            Row(
                "2. cold GET: CPU ceiling here",
                "MB/s",
                "ceiling",
                ceiling / 1e6,
                ref_cold / 1e6,
                mir_cold / 1e6,
                mir_cold / ceiling,
                f"context: ceiling {min(ceiling / direct, 1.0):.2f} x direct",
                None,
            )
        )
        add(
            Row(
                "2. cold GET: page-cache writes here",
                "MB/s",
                "new page cache",
                page_cache / 1e6,
                ref_cold / 1e6,
                mir_cold / 1e6,
                mir_cold / page_cache,
                "context: a cache that keeps the blob writes it",
                None,
            )
        )
        add(
            Row(
                "2. cold GET: upstream copies",
                "copies",
                "nginx proxy_cache",
                copies["nginx proxy_cache"],
                copies["reference"],
                copies["mirror"],
                None,
                "context: WAN bytes per cold blob",
                None,
            )
        )
        for proc in (ngx_plain, ngx_cache, checked, unchecked):
            proc.stop()
        path = f"/v2/{big.repo}/blobs/{big_blob.digest}"
        await settled()
        nginx_speed = await curl_speed(ngx_url)
        ref_warm = await curl_speed(ref_url + path)
        mir_warm = await curl_speed(mir_url + path)
        add(
            Row(
                "1. warm GET big blob",
                "MB/s",
                "nginx sendfile",
                nginx_speed / 1e6,
                ref_warm / 1e6,
                mir_warm / 1e6,
                mir_warm / nginx_speed,
                ">= 0.9 x nginx",
                mir_warm >= 0.9 * nginx_speed,
            )
        )

        # 4./5. manifests by tag (within TTL) and by digest, 32 connections.
        async with aiohttp.ClientSession() as s:
            for base in (ref_url, mir_url):
                await pull_image(s, base, app)
        tag_path = f"/v2/{app.repo}/manifests/{app.tag}"
        digest_path = f"/v2/{app.repo}/manifests/{app.digest}"
        ref_tag, ref_tag_p99 = wrk(ref_url + tag_path, sizes.wrk_seconds)
        mir_tag, mir_tag_p99 = wrk(mir_url + tag_path, sizes.wrk_seconds)
        add(
            Row(
                "4. manifest by tag, 32 conns",
                "req/s",
                "",
                None,
                ref_tag,
                mir_tag,
                mir_tag / ref_tag,
                ">= 10 x reference",
                mir_tag >= 10 * ref_tag,
            )
        )
        add(
            Row(
                "4. manifest by tag p99",
                "ms",
                "",
                None,
                ref_tag_p99,
                mir_tag_p99,
                None,
                "<= 10 ms",
                mir_tag_p99 <= 10,
            )
        )
        ref_dig, _ = wrk(ref_url + digest_path, sizes.wrk_seconds)
        mir_dig, _ = wrk(mir_url + digest_path, sizes.wrk_seconds)
        add(
            Row(
                "5. manifest by digest, 32 conns",
                "req/s",
                "",
                None,
                ref_dig,
                mir_dig,
                mir_dig / ref_dig,
                ">= 5 x reference",
                mir_dig >= 5 * ref_dig,
            )
        )

        # 6. whole-image pulls by many clients on a warm cache.
        ref_pull = await many_pulls(ref_url, app, sizes.pulls)
        mir_pull = await many_pulls(mir_url, app, sizes.pulls)
        add(
            Row(
                f"6. {sizes.pulls} whole-image pulls, warm",
                "s",
                "",
                None,
                ref_pull,
                mir_pull,
                mir_pull / ref_pull,
                "<= reference",
                mir_pull <= ref_pull,
            )
        )
        mirror_rss = mir.peak_rss()

        # 2b. cold GET through a WAN-like link: what a branch office sees.
        throttle = Throttle(upstream.port, sizes.link_rate)
        await throttle.start()
        wan = f"http://127.0.0.1:{throttle.port}"
        proc, url = mirror(work / "wan-mirror", wan)
        try:
            await wait_http(f"{url}/v2/")
            wan_direct = await curl_speed(wan + path, runs=1)
            wan_mirror = await curl_speed(url + path, runs=1)
        finally:
            proc.stop()
            await throttle.close()
        add(
            Row(
                f"2b. cold GET via {sizes.link_rate / 1e6:.0f} MB/s link",
                "MB/s",
                "direct via link",
                wan_direct / 1e6,
                None,
                wan_mirror / 1e6,
                wan_mirror / wan_direct,
                ">= 0.8 x direct",
                wan_mirror >= 0.8 * wan_direct,
            )
        )

        # 3. fan-out on a cold blob through a shared WAN-like link.
        fan_blob = fan.layers()[0]
        fan_path = f"/v2/{fan.repo}/blobs/{fan_blob.digest}"
        results: dict[str, tuple[float, float, int]] = {}
        for name, factory in (("reference", reference_proxy), ("mirror", mirror)):
            times = []
            fetches = 0
            for clients in (1, 20):
                throttle = Throttle(upstream.port, sizes.link_rate)
                await throttle.start()
                proc, url = factory(
                    work / f"fan-{name}-{clients}", f"http://127.0.0.1:{throttle.port}"
                )
                try:
                    await wait_http(f"{url}/v2/")
                    before = upstream.blob_gets(fan_blob.digest)
                    times.append(await curls_together([url + fan_path] * clients))
                    await asyncio.sleep(1.0)
                    if clients == 20:
                        fetches = upstream.blob_gets(fan_blob.digest) - before
                        if name == "mirror":
                            mirror_rss = max(mirror_rss, proc.peak_rss())
                finally:
                    proc.stop()
                    await throttle.close()
            results[name] = (times[0], times[1], fetches)
        ref1, ref20, ref_fetches = results["reference"]
        mir1, mir20, mir_fetches = results["mirror"]
        add(
            Row(
                "3. 20 clients, cold blob: upstream copies",
                "copies",
                "",
                None,
                ref_fetches,
                mir_fetches,
                None,
                "== 1",
                mir_fetches == 1,
            )
        )
        add(
            Row(
                "3. 20 clients vs 1 client (time)",
                "x one",
                "",
                None,
                ref20 / ref1,
                mir20 / mir1,
                None,
                "<= 1.2 x one client (issue 20)",
                mir20 <= 1.2 * mir1,
            )
        )

        add(
            Row(
                "7. mirror peak RSS",
                "MiB",
                "",
                None,
                None,
                mirror_rss / MiB,
                None,
                "<= 150 MB",
                mirror_rss <= 150e6,
            )
        )

        # 8. the soak: many clients pulling whole images, each cache cold at its start.
        services = {"reference": reference_proxy, "mirror": mirror}
        for fields in await soak.scenario(work, upstream, soaking, services, wait_http):
            add(Row(**fields))
    finally:
        for proc in procs:
            proc.stop()
        if "upstream" in locals():
            upstream.stop()
    report(rows, out)
    return rows


def report(rows: list[Row], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = ("scenario", "unit", "baseline", "reference", "mirror", "ratio")
    print("{:42} {:7} {:>18} {:>11} {:>11} {:>7}  target".format(*columns))
    for r in rows:
        base = f"{r.baseline:.1f} {r.baseline_name}" if r.baseline is not None else ""
        ref = f"{r.reference:.1f}" if r.reference is not None else ""
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        met = {True: "met", False: "MISSED", None: ""}[r.met]
        cells = (r.scenario, r.unit, base, ref, f"{r.mirror:.1f}", ratio)
        print("{:42} {:7} {:>18} {:>11} {:>11} {:>7}  ".format(*cells) + f"{r.target} {met}")
    (out / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    chart(rows, out / "results.png")
    progress(f"wrote results.json and results.png into {out}")


def chart(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.reference is not None and r.met is not None]
    columns = (len(shown) + 1) // 2
    fig, grid = plt.subplots(2, columns, figsize=(3.4 * columns, 6.4), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(shown) :]:
        ax.axis("off")
    for ax, r in zip(axes, shown, strict=False):
        names = ["reference", "mirror"] + ([r.baseline_name] if r.baseline is not None else [])
        values = [r.reference or 0, r.mirror] + ([r.baseline] if r.baseline is not None else [])
        # Context rows of the same measurement (nginx's proxies, the CPU ceiling) join its panel.
        scenario = r.scenario.split(" ", 1)[0]
        for c in rows:
            same = c.unit == r.unit and c.scenario.startswith(scenario)
            if same and c.met is None and c.baseline is not None:
                names.append(c.baseline_name)
                values.append(c.baseline)
        colors = ["#999999", "#2a7ab0"] + ["#66a060"] * (len(names) - 2)
        ax.bar(names, values, color=colors)
        ax.set_title(f"{r.scenario}\n({r.unit})", fontsize=8)
        crowded = len(names) > 3
        ax.tick_params(axis="x", labelsize=6 if crowded else 7, rotation=40 if crowded else 20)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    soak.add_soak_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args()
    soaking = soak.settings_from(args)
    with tempfile.TemporaryDirectory(prefix="rm-bench-") as tmp:
        os.chmod(tmp, 0o755)  # nginx's workers run as an unprivileged user
        rows = asyncio.run(run(SMOKE if args.smoke else FULL, args.out, Path(tmp), soaking))
    if rows:
        publish(args.out, args.publish, ["results.json", "results.png"])
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
