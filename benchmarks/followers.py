"""Two clients on one cold blob, the mirror with 2 workers: does the second client lose speed
when the other worker serves it? (issue 20: "the worker that does not fill tails the file as
today, or gets the window over a local socket: measure which is faster").

Usage: .venv/bin/python benchmarks/followers.py [--smoke] [--out DIR] [--publish [DIR]]
(after `bash benchmarks/run`'s set-up, or `bash tests/run`, has installed docker-registry and
the package into .venv). Writes followers.json to --out (benchmarks/out/, which git ignores);
--publish copies it into benchmarks/results/.

Two curl clients start together on a cold blob. The kernel spreads connections over the
workers (SO_REUSEPORT), so in some trials both land on the worker that fills the blob (the
second one reads the fill's in-memory window, or its temp file when behind it) and in the
others the second lands on the other worker, which follows the temp file from outside
(`RemoteFill`). The mirror's access log says which worker served each request and which one
filled ("miss"). The figure is the joining client's speed over the filling client's, by where
it was served: the window in the filling worker is what a window sent to the other worker over
a local socket could at best give, so the two medians say whether that is worth building.

Three settings: raw loopback with the defaults, raw loopback with `cache.outrun_disk: true`
(the filling worker's client then outruns the disk; a follower of the file cannot), and through
a shared 100 MB/s link (a WAN) with the defaults. Trials run until each placement has been seen
`--each` times (or 4 x that many trials).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.output import add_arguments, progress, publish  # noqa: E402
from benchmarks.runner import MiB, NoTokens, curl_once, wait_http  # noqa: E402
from benchmarks.runner import mirror as runner_mirror  # noqa: E402
from tests.fixtures.distribution import Registry  # noqa: E402
from tests.fixtures.synthetic_images import Builder, Pusher  # noqa: E402
from tests.fixtures.throttle import Throttle  # noqa: E402


@dataclass
class Setting:
    name: str
    size: int  # bytes of each trial's blob
    link: float | None  # bytes/s through a shared throttle; None: raw loopback
    outrun_disk: bool


FULL = [
    Setting("loopback, defaults", 128 * MiB, None, False),
    Setting("loopback, outrun_disk", 128 * MiB, None, True),
    Setting("100 MB/s link, defaults", 32 * MiB, 100e6, False),
]
SMOKE = [Setting("loopback, defaults", 4 * MiB, None, False)]


@dataclass
class Served:
    pid: int  # the worker
    cache: str  # "miss": this request's worker filled the blob; "joined": it followed
    speed: float  # bytes/s, from the request's start to its last byte, as the mirror saw it


def served_by(log: Path, digest: str) -> list[Served]:
    """The access lines for the blob's GETs so far."""
    found = []
    for line in log.read_text().splitlines():
        if digest in line and line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "request":
                speed = entry["bytes"] / (entry["duration_ms"] / 1000)
                found.append(Served(int(entry["pid"]), str(entry["cache"]), speed))
    return found


async def measure(setting: Setting, work: Path, upstream: Registry, each: int) -> dict[str, object]:
    throttle = None
    base = upstream.url
    if setting.link is not None:
        throttle = Throttle(upstream.port, setting.link)
        await throttle.start()
        base = f"http://127.0.0.1:{throttle.port}"
    # Which worker served a request, and which one filled, are in its access line (info).
    mirror, url = runner_mirror(
        work, base, outrun_disk=setting.outrun_disk, args=("--log-level", "info", "--workers", "2")
    )
    log = mirror.log
    builder = Builder(work / "images")
    pusher = Pusher(upstream.url, NoTokens())  # type: ignore[arg-type]  # no token server: the upstream checks none
    ratios: dict[str, list[float]] = {"same worker": [], "other worker": []}
    trials = []
    try:
        await wait_http(f"{url}/v2/")
        progress(f"{setting.name}: the mirror is up, 2 workers")
        for trial in range(4 * each):
            if min(map(len, ratios.values())) >= each:
                break
            image = builder.image(f"bench/follow{trial}", "1", [setting.size], oci=True)
            pusher.push(image)
            blob = image.layers()[0]
            blob.path.unlink()  # the upstream has it
            path = f"{url}/v2/{image.repo}/blobs/{blob.digest}"
            got = await asyncio.gather(curl_once(path), curl_once(path))
            if [size for _, size in got] != [blob.size, blob.size]:
                raise RuntimeError(f"short downloads: {got}")
            await asyncio.sleep(0.5)  # the access lines are written as the requests end
            seen = sorted(served_by(log, blob.digest), key=lambda s: s.cache != "miss")
            if [s.cache for s in seen] != ["miss", "joined"]:
                raise RuntimeError(f"expected one fill and one joiner, got {seen}")
            fill, join = seen
            where = "same worker" if fill.pid == join.pid else "other worker"
            ratios[where].append(join.speed / fill.speed)
            trials.append({"where": where, "fill_MBps": fill.speed / 1e6,
                           "join_MBps": join.speed / 1e6})  # fmt: skip
            progress(
                f"{setting.name}, trial {trial + 1}: joiner on the {where}, "
                f"{join.speed / 1e6:.0f} vs {fill.speed / 1e6:.0f} MB/s"
            )
            await asyncio.sleep(1.0)  # the fill's commit (and a rest fetch) out of the next
    finally:
        mirror.stop()
        if throttle is not None:
            await throttle.close()
    medians = {k: statistics.median(v) if v else None for k, v in ratios.items()}
    return {"setting": setting.name, "size": setting.size, "joiner_vs_filler": medians,
            "trials": trials}  # fmt: skip


async def run(settings: list[Setting], each: int, work: Path) -> list[dict[str, object]]:
    (work / "upstream").mkdir(parents=True)
    upstream = Registry(work / "upstream", None)
    upstream.start()
    progress("upstream up")
    try:
        return [await measure(s, work / f"s{i}", upstream, each) for i, s in enumerate(settings)]
    finally:
        upstream.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny blobs, a few trials")
    parser.add_argument("--each", type=int, help="trials wanted per placement (5; smoke 1)")
    add_arguments(parser)
    args = parser.parse_args()
    each = args.each or (1 if args.smoke else 5)
    with tempfile.TemporaryDirectory(prefix="rm-followers-") as tmp:
        results = asyncio.run(run(SMOKE if args.smoke else FULL, each, Path(tmp)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "followers.json").write_text(json.dumps(results, indent=2) + "\n")
    for result in results:
        medians = result["joiner_vs_filler"]
        assert isinstance(medians, dict)
        shown = ", ".join(
            f"{k} {v:.2f} x" if v is not None else f"{k} not seen" for k, v in medians.items()
        )
        print(f"{result['setting']:28} joiner vs filler (median): {shown}")
    publish(args.out, args.publish, ["followers.json"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
