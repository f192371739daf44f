"""Resident memory and speed of ImageEmbeddingCache look-ups in a memory-mapped 1M x 512 float16 cache.

    python benchmarks/cache_memory.py                # 1,000,000 x 512 float16, int ids (a 1 GiB file)
    python benchmarks/cache_memory.py --ids str      # string ids such as "000000123456.jpg"

A child process writes the cache into a temporary directory. Each measurement then runs in a fresh process,
which records its resident memory (``/proc/self/status``: VmRSS = RssAnon + RssFile + RssShmem) after its
imports, after ``ImageEmbeddingCache.load`` and after ``--lookups`` random look-ups in batches of ``--batch``:

- ``mmap, cold``: the file is dropped from the page cache first (``posix_fadvise(DONTNEED)``), as for a cache
  on disk that was not just written. This is the figure for "opening must not read it all".
- ``mmap, hot``: the whole file is in the page cache (just read). The kernel then maps whole cached folios
  around each faulted row, so RssFile grows with what is *cached*, not with what is read; those pages are
  shared and clean (reclaimable), and RssAnon shows the process's own memory.
- ``load(mmap=False)``: the reference, the whole file read into memory.

The ratios printed at the end compare the mmap modes to the full read, measured in this one run. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ID_STRIDE, ID_OFFSET = 7, 3  # int ids are 7 * j + 3: sparse, like COCO's, and computable in the child


def _image_id(j: int, kind: str) -> int | str:
    return ID_STRIDE * j + ID_OFFSET if kind == "int" else f"{ID_STRIDE * j + ID_OFFSET:012d}.jpg"


def _rss_mb() -> dict[str, float]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "RssAnon", "RssFile")}


def _write(path: str, rows: int, dim: int, kind: str) -> None:
    import torch

    from clip_rl_trl.embeddings import ImageEmbeddingCache

    g = torch.Generator().manual_seed(0)
    emb = torch.empty(rows, dim, dtype=torch.float16)
    for i in range(0, rows, 65536):  # generated in chunks: a float32 copy of the whole matrix would be 2 GiB
        chunk = torch.randn(min(65536, rows - i), dim, generator=g)
        emb[i : i + len(chunk)] = torch.nn.functional.normalize(chunk, dim=1).half()
    # Row order differs from id order, as in a real dataset.
    ids = [_image_id(j, kind) for j in torch.randperm(rows, generator=g).tolist()]
    ImageEmbeddingCache(ids, emb).save(path)


def _measure(path: str, rows: int, kind: str, lookups: int, batch: int, mmap: bool) -> dict[str, float]:
    import numpy as np

    from clip_rl_trl.embeddings import ImageEmbeddingCache

    rng = np.random.default_rng(1)
    batches = [
        [_image_id(j, kind) for j in rng.integers(0, rows, batch).tolist()] for _ in range(lookups // batch)
    ]
    base = _rss_mb()
    start = time.perf_counter()
    cache = ImageEmbeddingCache.load(path, mmap=mmap)
    load_s = time.perf_counter() - start
    opened = _rss_mb()
    checksum = 0.0
    first = []
    for ids in batches:
        start = time.perf_counter()
        checksum += float(cache[ids][:, 0].float().sum())
        first.append(time.perf_counter() - start)
    warm = []
    for ids in batches:  # the same rows again: now resident, the steady state of a training run
        start = time.perf_counter()
        cache[ids]
        warm.append(time.perf_counter() - start)
    done = _rss_mb()
    # Medians: on a shared machine a few batches stall on a descheduled thread and would dominate a mean.
    result: dict[str, float] = {"load_s": load_s, "first_us": 1e6 * statistics.median(first)}
    result["warm_us"] = 1e6 * statistics.median(warm)
    result.update({f"open_{k}": opened[k] - base[k] for k in base})
    result.update({f"total_{k}": done[k] - base[k] for k in base})
    assert checksum == checksum  # the look-ups really ran (and returned finite values)
    return result


def _drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_through(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass


def _child(*args: str) -> str:
    """Run this script in a fresh process; returns its stdout (a measurement prints one JSON line)."""
    return subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    ).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ids", choices=["int", "str"], default="int")
    parser.add_argument("--lookups", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--_write", help=argparse.SUPPRESS)
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    parser.add_argument("--_no_mmap", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._write:
        _write(args._write, args.rows, args.dim, args.ids)
        return
    common = [
        "--rows",
        str(args.rows),
        "--ids",
        args.ids,
        "--lookups",
        str(args.lookups),
        "--batch",
        str(args.batch),
    ]
    if args._measure:
        print(
            json.dumps(
                _measure(args._measure, args.rows, args.ids, args.lookups, args.batch, not args._no_mmap)
            )
        )
        return

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        path = os.path.join(tmp, "cache.safetensors")
        start = time.perf_counter()
        _child("--_write", path, "--dim", str(args.dim), *common)
        size_mb = os.path.getsize(path) / 2**20
        print(
            f"cache: {args.rows:,} x {args.dim} float16, {args.ids} ids, file {size_mb:,.1f} MiB "
            f"(built + saved in {time.perf_counter() - start:.1f} s); {args.lookups:,} random look-ups "
            f"in batches of {args.batch}"
        )
        results = {}
        _drop_from_page_cache(path)
        results["mmap, cold"] = json.loads(_child("--_measure", path, *common))
        _read_through(path)
        results["mmap, hot"] = json.loads(_child("--_measure", path, *common))
        _drop_from_page_cache(path)
        results["load(mmap=False)"] = json.loads(_child("--_measure", path, "--_no_mmap", *common))

    print(
        f"\n{'mode':<18} {'load s':>7} {'open: RSS MB (anon / file)':>27} "
        f"{'+ look-ups: RSS MB (anon / file)':>33} {'median us/batch: first':>23} {'warm':>6}"
    )
    for mode, r in results.items():
        print(
            f"{mode:<18} {r['load_s']:>7.2f} "
            f"{r['open_VmRSS']:>9.1f} ({r['open_RssAnon']:>6.1f} / {r['open_RssFile']:>7.1f}) "
            f"{r['total_VmRSS']:>15.1f} ({r['total_RssAnon']:>6.1f} / {r['total_RssFile']:>7.1f}) "
            f"{r['first_us']:>23.0f} {r['warm_us']:>6.0f}"
        )
    cold, full = results["mmap, cold"], results["load(mmap=False)"]
    print(
        f"\nratios, mmap cold / full read: RSS growth after open + look-ups "
        f"{cold['total_VmRSS'] / full['total_VmRSS']:.3f}, load time {cold['load_s'] / full['load_s']:.3f}, "
        f"warm look-up time {cold['warm_us'] / full['warm_us']:.2f}"
    )


if __name__ == "__main__":
    main()
