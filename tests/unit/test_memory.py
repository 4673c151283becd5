"""The serving process's malloc settings take effect: big blob-sized chunks freed by many
threads go back to the system instead of staying in per-thread arenas."""

from __future__ import annotations

import subprocess
import sys

CHURN = """
import re, sys, threading
if sys.argv[1] == "tuned":
    from mirror.memory import tune_malloc
    assert tune_malloc()
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
base = rss()
keep = []
def work():
    for r in range(30):
        big = bytes(8 << 20)  # freeing it raises glibc's dynamic mmap threshold
        del big
        chunks = [bytes(300_000 + (r * 7919 + k * 104729) % 400_000) for k in range(40)]
        keep.append(bytes(200))  # small survivors pin the arenas' tops
        del chunks
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(rss() - base)
"""


def growth(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, timeout=60
    )
    return int(out.stdout)


def test_blob_sized_chunks_are_given_back() -> None:
    assert growth("default") >= 16  # what a worker without the settings keeps (MiB)
    assert growth("tuned") <= 4
