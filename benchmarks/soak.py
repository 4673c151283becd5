"""Scenario 8, the soak: many clients pulling whole images for a while (issue 20).

The runner (`benchmarks/runner.py`) starts each cache cold, fed by the same upstream, and
calls `soak()` on it; this module builds and pushes the image set, runs the clients, samples
the service's memory, and turns both caches' results into the runner's rows.

- Image set (`FULL_SET`, `SMOKE_SET`): 40 images in 40 repositories, each a config, one "os"
  base layer and one "runtime" base layer from a shared pool, and one layer of its own, built
  with the synthetic image helpers (real tars, seeded bytes) and pushed once to the upstream
  (shared layers are mounted across repositories, not uploaded again).
- Popularity: Zipf (s = 1.1) over the images' ranks. Client i draws its images from its own
  `random.Random` seeded with (seed, i), so both caches see the same per-client sequence;
  the faster cache just gets further along it in the same time.
- Clients: one `benchmarks.pull_client.Client` each (kept-alive connections, one per request
  in flight), pulling as a container engine does: the manifest by tag with the index and
  manifest types in Accept, then the config, then the layers (3 at a time, Docker's default).
  Each body is hashed with SHA-256 while it streams, never held whole; a wrong digest or size,
  a failed status, a timeout, or a pull still running after the grace period is an error,
  counted and kept (the first few, verbatim) in soak.json.
- The clients share the machine with the service they load, which on a real site they do
  not: they are other machines. So they are kept from setting the service's pace: their HTTP
  client reads into reused buffers and hashes in place (aiohttp's took 1.34 CPU s per GB
  verified, this one 0.93, most of it the SHA-256 itself), and their processes run at nice
  `CLIENT_NICE`, so the service and the prober get a core when they need one and the clients
  take the rest. Both caches are measured the same way; the reference, which needs 5 times
  the mirror's CPU per pull, gains the most from it.
- Measured: completed pulls per second, the manifest GET's latency (request sent to last
  byte read) p50 and p99, PSS of every process of the service (the PID the runner started
  and all its descendants, /proc/PID/smaps_rollup) every 0.5 s from a thread (start, peak,
  end), open descriptors (/proc/PID/fd) before and after, the upstream requests the soak
  caused (from the upstream's log), and this client process's event-loop lag (the clients
  share one core-bound process: when it lags, measured latencies include its queueing).
- `--profile-soak`: py-spy records one mirror worker during the soak into the output
  directory (flamegraph SVG, or speedscope JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from bisect import bisect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as a script: the repository's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.output import add_arguments, progress
from benchmarks.pull_client import Client, HTTPError
from tests.fixtures.distribution import Registry
from tests.fixtures.synthetic_images import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZ,
    OCI_MANIFEST,
    Blob,
    Builder,
    Image,
    Pusher,
)

KiB = 1024
MiB = 1024 * KiB
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
LAYER_DOWNLOADS = 3  # concurrent layer downloads per pull, as Docker's default
REQUEST_TIMEOUT = 30.0  # seconds one GET may take, its whole body read
GRACE = 60.0  # seconds a pull started before the end may take to finish
SAMPLE_EVERY = 0.5  # seconds between PSS samples
ERRORS_KEPT = 20

# Targets from issue 20.
PULLS_VS_REFERENCE = 3.0
MANIFEST_P99_MS = 20.0
PSS_LIMIT = 120e6
FLAT = 1.1  # "flat": PSS at the end at most this many times PSS at mid-soak


@dataclass(frozen=True)
class ImageSet:
    """`images` images; image i (its popularity rank) has the "os" layer os[i % len(os)], the
    "runtime" layer runtime[i % len(runtime)], and a layer of its own of own[i % len(own)]."""

    images: int
    os: tuple[int, ...]
    runtime: tuple[int, ...]
    own: tuple[int, ...]


# About 82 MiB in the upstream, 7.2 MiB per pull on average under the Zipf weights.
FULL_SET = ImageSet(
    40,
    os=(MiB // 2, 1 * MiB, 2 * MiB, 3 * MiB),
    runtime=(2 * MiB, 3 * MiB, 4 * MiB, 8 * MiB, 12 * MiB, 16 * MiB),
    own=(64 * KiB, 256 * KiB, MiB // 2, 1 * MiB, 2 * MiB),
)
SMOKE_SET = ImageSet(
    12,
    os=(32 * KiB, 64 * KiB),
    runtime=(96 * KiB, 128 * KiB, 256 * KiB),
    own=(4 * KiB, 16 * KiB, 48 * KiB),
)


@dataclass
class Settings:
    seconds: float
    clients: int
    images: ImageSet
    seed: int = 20
    zipf_s: float = 1.1
    profile: str | None = None  # py-spy's output format, or None for no profile
    out: Path = Path("benchmarks/out")


# -- the image set --------------------------------------------------------------------------


def _layer(builder: Builder, name: str, size: int) -> tuple[Blob, str]:
    return builder.layer(f"soak-{name}-{size}", size, OCI_LAYER_GZ if size <= MiB else OCI_LAYER)


def compose(builder: Builder, repo: str, tag: str, layers: list[tuple[Blob, str]]) -> Image:
    """An OCI image of `layers` (blob, diff_id), as `Builder.image` makes one, but with layers
    that other images share."""
    diff_ids = [diff for _, diff in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {"Cmd": ["/data"], "Labels": {"repo": repo}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2024-01-01T00:00:00Z"} for _ in diff_ids],
        },
        sort_keys=True,
    ).encode()
    config_blob = builder._store(config, OCI_CONFIG)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_blob.descriptor(),
            "layers": [blob.descriptor() for blob, _ in layers],
        },
        indent=3,
    ).encode()
    blobs = [config_blob, *(blob for blob, _ in layers)]
    return Image(repo, tag, OCI_MANIFEST, manifest, blobs, platform={"architecture": "amd64"})


def build_images(builder: Builder, pusher: Pusher, spec: ImageSet) -> list[Image]:
    """Build the set and push it; shared layers are mounted from the first repository that
    has them, so each crosses once."""
    os_layers = [_layer(builder, f"os{i}", size) for i, size in enumerate(spec.os)]
    runtimes = [_layer(builder, f"runtime{i}", size) for i, size in enumerate(spec.runtime)]
    pushed: dict[str, str] = {}  # digest -> a repository that has it
    images = []
    for i in range(spec.images):
        own = _layer(builder, f"app{i}", spec.own[i % len(spec.own)])
        layers = [os_layers[i % len(os_layers)], runtimes[i % len(runtimes)], own]
        image = compose(builder, f"soak/app{i:02d}", "1", layers)
        for blob in image.blobs:
            source = pushed.get(blob.digest)
            if source is not None:
                pusher.client.post(
                    f"{pusher.url}/v2/{image.repo}/blobs/uploads/",
                    params={"mount": blob.digest, "from": source},
                )  # 201 when mounted; otherwise the push uploads it
        pusher.push(image)
        for blob in image.blobs:
            pushed.setdefault(blob.digest, image.repo)
        images.append(image)
    return images


def describe(images: list[Image], weights: list[float]) -> dict[str, float]:
    unique = {b.digest: b.size for image in images for b in image.blobs}
    total = sum(weights)
    mean = sum(w * sum(b.size for b in im.blobs) for w, im in zip(weights, images, strict=True))
    return {
        "images": len(images),
        "unique_blobs": len(unique),
        "upstream_MiB": round(sum(unique.values()) / MiB, 1),
        "mean_MiB_per_pull": round(mean / total / MiB, 2),
        "top_image_share": round(weights[0] / total, 3),
    }


def zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (rank**s) for rank in range(1, n + 1)]


# -- the service's processes ----------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """`root` and every process under it (the mirror's supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def pss(pids: list[int]) -> int:
    """Bytes of proportional set size of these processes together."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue  # a process that just ended
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes used so far (those still running)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def open_fds(pids: list[int]) -> dict[str, int]:
    """Open descriptors of these processes, by kind (socket, pipe, file, ...) and in total."""
    kinds: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            kind = target.split(":", 1)[0] if ":" in target else "file"
            kinds[kind] = kinds.get(kind, 0) + 1
    return {"total": sum(kinds.values()), **kinds}


class MemorySampler:
    """PSS of the service's processes every SAMPLE_EVERY seconds, on a thread of its own so a
    busy client event loop does not delay the samples."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.samples: list[tuple[float, int, int]] = []  # (seconds, bytes, processes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)
        self.started = time.monotonic()

    def _run(self) -> None:
        while True:
            pids = descendants(self.root)
            self.samples.append((time.monotonic() - self.started, pss(pids), len(pids)))
            if self._stop.wait(SAMPLE_EVERY):
                return

    def __enter__(self) -> MemorySampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# -- clients --------------------------------------------------------------------------------


class PullError(Exception):
    pass


@dataclass
class Tally:
    pulls: int = 0
    blob_bytes: int = 0
    manifest_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    seed: int = 0
    picks: list[list[int]] = field(default_factory=list)  # image ranks, per client, in order

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < ERRORS_KEPT:
            self.error_samples.append(message)


async def get_blob(client: Client, target: str, digest: str, size: int) -> int:
    """GET a blob, hashed as it streams; raises PullError unless it is exactly `digest`."""
    r = await client.get(target)
    if r.status != 200:
        raise PullError(f"GET {target}: HTTP {r.status}")
    if r.digest != digest or r.length != size:
        raise PullError(
            f"GET {target}: digest mismatch, got {r.digest} ({r.length} bytes), want {size} bytes"
        )
    return r.length


async def pull(client: Client, image: Pullable, tally: Tally) -> None:
    """One whole-image pull: manifest by tag, config, layers (LAYER_DOWNLOADS at a time)."""
    target = f"/v2/{image.repo}/manifests/{image.tag}"
    start = time.perf_counter()
    r = await client.get(target, {"Accept": ACCEPT}, keep_body=True)
    tally.manifest_ms.append((time.perf_counter() - start) * 1000)
    if r.status != 200:
        raise PullError(f"GET {target}: HTTP {r.status}")
    header = r.headers.get("docker-content-digest")
    if r.digest != image.digest or header not in (None, r.digest):
        raise PullError(f"GET {target}: manifest {r.digest} (header {header}), want {image.digest}")
    manifest = json.loads(r.body)
    blobs = f"/v2/{image.repo}/blobs/"
    config = manifest["config"]
    # (`tally.x += await f()` would read tally.x before the await: other clients' bytes lost)
    received = await get_blob(client, blobs + config["digest"], **_want(config))
    slots = asyncio.Semaphore(LAYER_DOWNLOADS)

    async def layer(desc: dict[str, Any]) -> int:
        async with slots:
            return await get_blob(client, blobs + desc["digest"], **_want(desc))

    received += sum(await asyncio.gather(*(layer(d) for d in manifest["layers"])))
    tally.blob_bytes += received


def _want(descriptor: dict[str, Any]) -> dict[str, Any]:
    return {"digest": descriptor["digest"], "size": descriptor["size"]}


class Pullable(Protocol):
    repo: str
    tag: str
    digest: str
    ref: str


async def client(
    i: int,
    base: str,
    images: Sequence[Pullable],
    cumulative: list[float],
    deadline: float,
    tally: Tally,
) -> None:
    rng = random.Random(f"soak:{tally.seed}:{i}")
    picks = tally.picks[i]
    where = urlsplit(base)
    session = Client(where.hostname or "127.0.0.1", where.port or 80, timeout=REQUEST_TIMEOUT)
    try:
        while time.monotonic() < deadline:
            rank = bisect(cumulative, rng.random() * cumulative[-1])
            picks.append(rank)
            try:
                await pull(session, images[rank], tally)
                tally.pulls += 1
            except (PullError, HTTPError, OSError, TimeoutError, ValueError, KeyError) as e:
                tally.error(f"client {i}, {images[rank].ref}: {type(e).__name__}: {e}")
    finally:
        await session.close()


PROBE_EVERY = 0.01  # seconds between the prober's requests


def probe(url: str, seconds: float) -> list[float]:
    """Latencies (ms) of a manifest GET by tag every PROBE_EVERY s for `seconds`, one at a
    time on one kept-alive connection, in a process of its own: what a new client sees of
    the service under the soak, without the loaded clients' own event-loop lag."""
    import http.client

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        conn.request("GET", parts.path, headers={"Accept": ACCEPT})
        response = conn.getresponse()
        response.read()
        latencies.append((time.perf_counter() - start) * 1000)
        if response.status != 200:
            raise PullError(f"probe GET {url}: HTTP {response.status}")
        time.sleep(PROBE_EVERY)
    conn.close()
    return latencies


async def start_probe(base: str, image: Image, seconds: float) -> asyncio.subprocess.Process:
    url = f"{base}/v2/{image.repo}/manifests/{image.tag}"
    return await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--probe", url, str(seconds),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def probe_result(proc: asyncio.subprocess.Process, tally: Tally) -> list[float]:
    out, err = await proc.communicate()
    if proc.returncode != 0:
        tally.error(f"manifest prober failed: {err.decode(errors='replace')[-300:]}")
        return []
    latencies: list[float] = json.loads(out)
    return latencies


async def loop_lag(stop: asyncio.Event, lags: list[float]) -> None:
    """How late a 20 ms timer fires on this (the clients') event loop, in ms."""
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.02)
        lags.append((time.perf_counter() - before - 0.02) * 1000)


CLIENT_PROCESSES = 4  # the clients run in this many processes: one Python loop hashing every
# byte of 32 clients' pulls saturates its core before the mirror does (measured: 0.85 CPU s/s)
CLIENT_NICE = 10  # their priority: below the service's and the prober's (see the docstring)


@dataclass(frozen=True)
class PulledImage:
    """What a client needs of an image (the clients' processes get these as JSON)."""

    repo: str
    tag: str
    digest: str
    ref: str


async def client_process_main(spec: dict[str, Any]) -> dict[str, Any]:
    """One clients' process: clients `spec["indexes"]` until the deadline; its tally as JSON."""
    os.nice(CLIENT_NICE)
    images = [PulledImage(**i) for i in spec["images"]]
    tally = Tally(seed=spec["seed"], picks=[[] for _ in range(spec["clients"])])
    stop, lags = asyncio.Event(), list[float]()
    lagger = asyncio.create_task(loop_lag(stop, lags))
    deadline = time.monotonic() + spec["seconds"]
    cpu = time.process_time()
    tasks = [
        asyncio.create_task(client(i, spec["base"], images, spec["cumulative"], deadline, tally))
        for i in spec["indexes"]
    ]
    _, pending = await asyncio.wait(tasks, timeout=spec["seconds"] + GRACE)
    for task in pending:
        task.cancel()
        tally.error(f"a pull still running {GRACE:.0f} s after the end, cancelled")
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            tally.error(f"client crashed: {task.exception()!r}")
    stop.set()
    await lagger
    return {
        **asdict(tally),
        "picks": {str(i): tally.picks[i] for i in spec["indexes"]},
        "lag_p99": percentile(lags, 0.99),
        "cpu": time.process_time() - cpu,
    }


async def run_client_processes(
    base: str, images: list[Image], cumulative: list[float], settings: Settings, tally: Tally
) -> tuple[float, float]:
    """The soak's clients, spread over CLIENT_PROCESSES processes (client i in process
    i mod P, with the same per-client random sequence as ever); their tallies merged into
    `tally`. Returns the worst process's loop lag p99 and the processes' CPU seconds."""
    processes = min(CLIENT_PROCESSES, settings.clients)
    shared = {
        "base": base, "seed": settings.seed, "clients": settings.clients,
        "seconds": settings.seconds, "cumulative": cumulative,
        "images": [asdict(PulledImage(i.repo, i.tag, i.digest, i.ref)) for i in images],
    }  # fmt: skip
    procs = []
    for k in range(processes):
        spec = {**shared, "indexes": list(range(k, settings.clients, processes))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client-process",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode())
        await proc.stdin.drain()
        proc.stdin.close()
        procs.append(proc)
    lag, cpu = 0.0, 0.0
    for proc in procs:
        out, err = await proc.communicate()
        if proc.returncode != 0:
            tally.error(f"a clients' process failed: {err.decode(errors='replace')[-300:]}")
            continue
        part = json.loads(out)
        tally.pulls += part["pulls"]
        tally.blob_bytes += part["blob_bytes"]
        tally.manifest_ms += part["manifest_ms"]
        for message in part["error_samples"]:
            tally.error(message)
        tally.errors += part["errors"] - len(part["error_samples"])
        for i, picks in part["picks"].items():
            tally.picks[int(i)] = picks
        lag, cpu = max(lag, part["lag_p99"]), cpu + part["cpu"]
    return lag, cpu


# -- the profile hook -----------------------------------------------------------------------


def py_spy() -> str | None:
    """py-spy's path, installed into this interpreter's environment if absent."""
    local = Path(sys.executable).parent / "py-spy"
    found = shutil.which("py-spy") or (str(local) if local.exists() else None)
    if found is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "py-spy"],
            check=False, timeout=300,
        )  # fmt: skip
        found = str(local) if local.exists() else shutil.which("py-spy")
    return found


async def start_profile(
    root: int, seconds: float, settings: Settings
) -> tuple[asyncio.subprocess.Process | None, dict[str, Any]]:
    """py-spy recording one worker (a child of the supervisor) for the soak's duration."""
    workers = [pid for pid in descendants(root) if pid != root]
    info: dict[str, Any] = {"format": settings.profile}
    binary = py_spy()
    if binary is None:
        info["error"] = "py-spy is not installed and `pip install py-spy` failed"
        return None, info
    if not workers:
        info["error"] = "no worker process found under the supervisor"
        return None, info
    suffix = "svg" if settings.profile == "flamegraph" else "speedscope.json"
    path = settings.out / f"soak-profile-worker.{suffix}"
    settings.out.mkdir(parents=True, exist_ok=True)
    info.update(pid=workers[0], path=str(path))
    proc = await asyncio.create_subprocess_exec(
        binary, "record", "-p", str(workers[0]), "-d", str(max(1, round(seconds))),
        "-r", "100", "--nonblocking", "-f", str(settings.profile), "-o", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    return proc, info


async def end_profile(proc: asyncio.subprocess.Process | None, info: dict[str, Any]) -> None:
    if proc is None:
        return
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        output, _ = await proc.communicate()
        info["error"] = "py-spy did not finish in time"
    text = output.decode(errors="replace").strip()
    info["returncode"] = proc.returncode
    info["output"] = text[-1500:]
    if proc.returncode != 0 or not await asyncio.to_thread(os.path.exists, info["path"]):
        hint = ""
        if "Permission" in text or "ptrace" in text.lower() or "Operation not permitted" in text:
            hint = " (ptrace not permitted here: needs CAP_SYS_PTRACE or ptrace_scope 0)"
        info.setdefault("error", f"py-spy failed{hint}: {text[-300:]}")


# -- one soak -------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    clients: int
    seconds: float  # from the first request to the last pull's end
    pulls: int
    pulls_per_s: float
    blob_MB_per_s: float
    manifest_p50_ms: float
    manifest_p99_ms: float
    manifests: int
    probe_p50_ms: float
    probe_p99_ms: float
    probes: int
    errors: int
    error_samples: list[str]
    pss_start: int
    pss_peak: int
    pss_mid: int
    pss_end: int
    processes: int
    fds_before: dict[str, int]  # by kind, and "total"
    fds_after: dict[str, int]
    upstream_blob_gets: int
    upstream_manifest_requests: int
    client_loop_lag_p99_ms: float
    client_cpu: float  # CPU seconds per second of the clients' processes
    service_cpu: float  # CPU seconds per second of the service's processes
    picks: list[list[int]]
    pss_samples: list[tuple[float, int, int]]
    profile: dict[str, Any] | None = None


def _upstream_counts(upstream: Registry) -> tuple[int, int]:
    requests = upstream.requests()
    blobs = sum(1 for r in requests if r.method == "GET" and "/blobs/sha256:" in r.uri)
    manifests = sum(1 for r in requests if "/manifests/" in r.uri)
    return blobs, manifests


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def soak(
    name: str, root: int, base: str, upstream: Registry, images: list[Image], settings: Settings
) -> Result:
    """`settings.clients` clients pulling from `base` for `settings.seconds`; `root` is the PID
    of the service's process the runner started (its descendants are counted too)."""
    weights = zipf_weights(len(images), settings.zipf_s)
    cumulative = [sum(weights[: k + 1]) for k in range(len(weights))]
    tally = Tally(seed=settings.seed, picks=[[] for _ in range(settings.clients)])
    fds_before = open_fds(descendants(root))
    up_before = await asyncio.to_thread(_upstream_counts, upstream)
    profiler, profile = None, None
    if settings.profile and name == "mirror":
        profiler, profile = await start_profile(root, settings.seconds, settings)
    with MemorySampler(root) as sampler:
        await asyncio.sleep(SAMPLE_EVERY * 1.5)  # a sample or two before the load
        prober = await start_probe(base, images[0], settings.seconds)
        service = descendants(root)
        service_cpu = cpu_seconds(service)
        start = time.monotonic()
        lag_p99, cpu = await run_client_processes(base, images, cumulative, settings, tally)
        probed = await probe_result(prober, tally)
        elapsed = time.monotonic() - start
        service_cpu = cpu_seconds(service) - service_cpu
        load_end = time.monotonic() - sampler.started
        await asyncio.sleep(SAMPLE_EVERY * 1.5)
    await end_profile(profiler, profile or {})
    await asyncio.sleep(1.0)  # let the service close what the clients' ends left open
    fds_after = open_fds(descendants(root))
    up_after = await asyncio.to_thread(_upstream_counts, upstream)
    samples = sampler.samples
    during = [s for s in samples if s[0] <= load_end + SAMPLE_EVERY] or samples
    loaded_at = samples[0][0] + SAMPLE_EVERY * 1.5
    mid = min(during, key=lambda s: abs(s[0] - (loaded_at + load_end) / 2))
    return Result(
        name=name,
        clients=settings.clients,
        seconds=round(elapsed, 2),
        pulls=tally.pulls,
        pulls_per_s=tally.pulls / elapsed,
        blob_MB_per_s=tally.blob_bytes / elapsed / 1e6,
        manifest_p50_ms=percentile(tally.manifest_ms, 0.50),
        manifest_p99_ms=percentile(tally.manifest_ms, 0.99),
        manifests=len(tally.manifest_ms),
        probe_p50_ms=percentile(probed, 0.50),
        probe_p99_ms=percentile(probed, 0.99),
        probes=len(probed),
        errors=tally.errors,
        error_samples=tally.error_samples,
        pss_start=samples[0][1],
        pss_peak=max(s[1] for s in samples),
        pss_mid=mid[1],
        pss_end=during[-1][1],
        processes=max(s[2] for s in samples),
        fds_before=fds_before,
        fds_after=fds_after,
        upstream_blob_gets=up_after[0] - up_before[0],
        upstream_manifest_requests=up_after[1] - up_before[1],
        client_loop_lag_p99_ms=lag_p99,
        client_cpu=round(cpu / elapsed, 2),
        service_cpu=round(service_cpu / elapsed, 2),
        picks=tally.picks,
        pss_samples=samples,
        profile=profile,
    )


def same_sequence(a: Result, b: Result) -> bool:
    """Each client's picks in one run are a prefix of its picks in the other."""
    for x, y in zip(a.picks, b.picks, strict=True):
        n = min(len(x), len(y))
        if x[:n] != y[:n]:
            return False
    return True


# -- rows and files -------------------------------------------------------------------------


def rows(ref: Result, mir: Result) -> list[dict[str, Any]]:
    """The runner's rows (its `Row` fields) for scenario 8."""
    label = f"8. soak {mir.clients} clients"

    def row(
        what: str, unit: str, r: float, m: float, target: str, met: bool | None, ratio: Any = None
    ) -> dict[str, Any]:
        return {
            "scenario": f"{label}: {what}", "unit": unit, "baseline_name": "", "baseline": None,
            "reference": r, "mirror": m, "ratio": ratio, "target": target, "met": met,
        }  # fmt: skip

    flat = mir.pss_end <= FLAT * mir.pss_mid

    def per_pull(r: Result) -> float:
        return r.service_cpu / r.pulls_per_s * 1000 if r.pulls_per_s else float("nan")

    ratio = mir.pulls_per_s / ref.pulls_per_s if ref.pulls_per_s else None
    return [
        row("pulls/s", "pulls/s", ref.pulls_per_s, mir.pulls_per_s,
            f">= {PULLS_VS_REFERENCE:.0f} x reference",
            ratio is not None and ratio >= PULLS_VS_REFERENCE, ratio),
        row("manifest p50, prober", "ms", ref.probe_p50_ms, mir.probe_p50_ms,
            f"context: {mir.probes} GETs by tag from a process of its own", None),
        row("manifest p99, prober", "ms", ref.probe_p99_ms, mir.probe_p99_ms,
            f"<= {MANIFEST_P99_MS:.0f} ms", mir.probe_p99_ms <= MANIFEST_P99_MS),
        row("manifest p50 in the pulls", "ms", ref.manifest_p50_ms, mir.manifest_p50_ms,
            "context", None),
        row("manifest p99 in the pulls", "ms", ref.manifest_p99_ms, mir.manifest_p99_ms,
            "context: with the clients' own loop lag", None),
        row("PSS at start", "MB", ref.pss_start / 1e6, mir.pss_start / 1e6,
            f"context: all {mir.processes} processes", None),
        row("PSS peak", "MB", ref.pss_peak / 1e6, mir.pss_peak / 1e6,
            f"<= {PSS_LIMIT / 1e6:.0f} MB", mir.pss_peak <= PSS_LIMIT),
        row("PSS at end", "MB", ref.pss_end / 1e6, mir.pss_end / 1e6,
            f"flat: <= {FLAT} x mid-soak ({mir.pss_mid / 1e6:.1f} MB)", flat),
        row("open fds before", "fds", ref.fds_before["total"], mir.fds_before["total"],
            "context", None),
        row("open fds after", "fds", ref.fds_after["total"], mir.fds_after["total"],
            f"context: mirror's {_kinds(mir.fds_after)}", None),
        row("upstream blob GETs", "GETs", ref.upstream_blob_gets, mir.upstream_blob_gets,
            "context: WAN fetches", None),
        row("upstream manifest requests", "reqs", ref.upstream_manifest_requests,
            mir.upstream_manifest_requests, "context", None),
        row("service CPU per pull", "ms", per_pull(ref), per_pull(mir),
            "context: what each pull costs the service; the clients' verification takes the"
            " rest of the machine", None),
        row("service CPU", "CPU s/s", ref.service_cpu, mir.service_cpu,
            f"context: clients' {CLIENT_PROCESSES} processes {ref.client_cpu} / "
            f"{mir.client_cpu} CPU s/s, {os.cpu_count()} cores", None),
        row("client loop lag p99", "ms", ref.client_loop_lag_p99_ms,
            mir.client_loop_lag_p99_ms, "context: in the latencies", None),
        row("errors", "errors", ref.errors, mir.errors, "== 0 (both)",
            mir.errors == 0 and ref.errors == 0),
    ]  # fmt: skip


def _kinds(fds: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in fds.items() if kind != "total")


def write(out: Path, ref: Result, mir: Result, image_set: dict[str, float]) -> bool:
    """soak.json: both results in full (samples, errors, profile). Returns whether both caches
    saw the same request sequence."""
    same = same_sequence(ref, mir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "image_set": image_set,
        "same_sequence": same,
        "results": {r.name: {**asdict(r), "picks": [len(p) for p in r.picks]} for r in (ref, mir)},
    }
    (out / "soak.json").write_text(json.dumps(doc, indent=1) + "\n")
    return same


# -- the scenario, for the runner and on its own --------------------------------------------


class Service(Protocol):
    popen: subprocess.Popen[bytes]

    def stop(self) -> None: ...


class _NoTokens:
    def issue(self, user: str | None, scopes: list[str]) -> str:
        return "unused"  # the benchmark upstream runs without auth


async def scenario(
    work: Path,
    upstream: Registry,
    settings: Settings,
    services: Mapping[str, Callable[[Path, str], tuple[Service, str]]],
    wait: Callable[[str], Awaitable[None]],
) -> list[dict[str, Any]]:
    """Build and push the image set, soak each cache in `services` ("reference" and "mirror":
    functions (work dir, upstream URL) -> (Service, URL), as the runner's) started cold, write
    soak.json, and return the rows."""
    pusher = Pusher(upstream.url, _NoTokens())  # type: ignore[arg-type]  # a token source that never logs in
    try:
        images = await asyncio.to_thread(
            build_images, Builder(work / "soak-images"), pusher, settings.images
        )
    finally:
        pusher.close()
    image_set = describe(images, zipf_weights(len(images), settings.zipf_s))
    progress(f"soak: images pushed, {image_set}")
    results: dict[str, Result] = {}
    for name in ("reference", "mirror"):
        service, url = services[name](work / f"soak-{name}", upstream.url)
        try:
            await wait(f"{url}/v2/")
            results[name] = await soak(name, service.popen.pid, url, upstream, images, settings)
        finally:
            service.stop()
        r = results[name]
        progress(
            f"soak: {name} done, {r.pulls} pulls in {r.seconds:.1f} s, {r.errors} errors, "
            f"{r.blob_MB_per_s:.0f} MB/s of blobs verified, "
            f"clients' process {r.client_cpu:.2f} CPU s/s"
            + (f"; py-spy: {r.profile.get('error') or r.profile['path']}" if r.profile else "")
        )
    if not write(settings.out, results["reference"], results["mirror"], image_set):
        raise RuntimeError("the soak's clients did not see the same sequence on both caches")
    return rows(results["reference"], results["mirror"])


def add_soak_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--soak-seconds", type=float, help="soak length (90; smoke 3)")
    parser.add_argument("--soak-clients", type=int, help="soak clients (32; smoke 4)")
    parser.add_argument(
        "--profile-soak", nargs="?", const="flamegraph", choices=("flamegraph", "speedscope"),
        help="py-spy records a mirror worker during the soak, into --out",
    )  # fmt: skip


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        args.soak_seconds or (3 if args.smoke else 90),
        args.soak_clients or (4 if args.smoke else 32),
        SMOKE_SET if args.smoke else FULL_SET,
        profile=args.profile_soak,
        out=args.out,
    )


async def _alone(settings: Settings, work: Path) -> list[dict[str, Any]]:
    from benchmarks import runner

    (work / "upstream").mkdir(parents=True)
    upstream = Registry(work / "upstream", None)
    upstream.start()
    try:
        services = {"reference": runner.reference_proxy, "mirror": runner.mirror}
        return await scenario(work, upstream, settings, services, runner.wait_http)
    finally:
        upstream.stop()


def main() -> int:
    """The soak alone (no other scenario): soak.json in --out and the rows printed."""
    import tempfile

    parser = argparse.ArgumentParser(description="scenario 8 of benchmarks/runner.py alone")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    add_soak_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rm-soak-") as tmp:
        found = asyncio.run(_alone(settings_from(args), Path(tmp)))
    for r in found:
        met = {True: "met", False: "MISSED", None: ""}[r["met"]]
        ratio = f" ({r['ratio']:.2f} x)" if r["ratio"] is not None else ""
        print(
            f"{r['scenario']:48} mirror {r['mirror']:9.1f}{ratio}  reference {r['reference']:9.1f}"
            f"  {r['unit']:7}  {r['target']} {met}"
        )
    return 0 if all(r["met"] is not False for r in found if "errors" in r["scenario"]) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client-process"]:  # one clients' process (run_client_processes)
        print(json.dumps(asyncio.run(client_process_main(json.load(sys.stdin)))))
        raise SystemExit(0)
    if sys.argv[1:2] == ["--probe"]:  # the prober's own process (start_probe)
        print(json.dumps(probe(sys.argv[2], float(sys.argv[3]))))
        raise SystemExit(0)
    raise SystemExit(main())
