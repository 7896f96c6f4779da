"""Hardware floors measured next to the engine in benchmarks: the disk's parallel read bandwidth
for expert-sized blocks (cold page cache, or O_DIRECT)."""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from pathlib import Path


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def disk_read_bandwidth(
    path: Path, stride: int, nbytes: int, blocks: int, threads: int, direct: bool, sequential: bool
) -> float:
    """GB/s of `threads` parallel preads from a cold page cache: `blocks` random expert blocks,
    or (sequential) the same number of bytes as consecutive 4 MiB reads from a random start."""
    drop_caches()
    total_blocks = os.path.getsize(path) // stride
    rng = random.Random(threads * 4 + 2 * direct + sequential)
    if sequential:
        size = 4 << 20
        start = rng.randrange(0, total_blocks * stride - blocks * stride) // size * size
        jobs = [start + i * size for i in range(blocks * stride // size)]
    else:
        size = stride if direct else nbytes
        jobs = [b * stride for b in rng.sample(range(total_blocks), blocks)]
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    lock = threading.Lock()
    done = [0]

    def worker() -> None:
        buf = mmap.mmap(-1, size)  # page aligned, as O_DIRECT needs
        while True:
            with lock:
                if not jobs:
                    return
                offset = jobs.pop()
            got = os.preadv(fd, [buf], offset)
            with lock:
                done[0] += got

    n = len(jobs)
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    os.close(fd)
    assert done[0] == n * size
    return done[0] / elapsed / 1e9
