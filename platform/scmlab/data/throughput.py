"""Loader throughput: samples per second read, decoded and batched by make_loader (jobs/bench.py --suite data)."""

import statistics
import time

from .loader import make_loader


def measure(url: str, *, batch_size: int, num_workers: int, batches: int, warmup: int = 5, seed: int = 0) -> dict:
    """Time `batches` batches from the dataset at `url`, after `warmup` batches (worker start-up, the first fill of
    the shuffle buffer). Returns {"url", "batch_size", "num_workers", "batches", "seconds", "samples_per_s"}."""
    loader = make_loader(url, batch_size=batch_size, seed=seed, num_workers=num_workers)
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    return {"url": url, "batch_size": batch_size, "num_workers": num_workers, "batches": batches,
            "seconds": seconds, "samples_per_s": batches * batch_size / seconds}


def compare(local: str, remote: str, *, batch_size: int, batches: int, workers: tuple[int, ...] = (1, 2),
            repeats: int = 3) -> dict:
    """`measure` the same dataset on local disk and in object storage for each number of loader workers,
    alternating the two `repeats` times (a shared machine's noise hits both alike) and keeping the median.
    Returns {"runs": [every measure result], "samples_per_s": {workers: {"local", "remote"}},
    "ratio": {workers: remote / local}} (target: ratio >= 0.9)."""
    runs, speed, ratio = [], {}, {}
    for n in workers:
        timed = {"local": [], "remote": []}
        for _ in range(repeats):
            for where, url in (("local", local), ("remote", remote)):
                runs.append(measure(url, batch_size=batch_size, num_workers=n, batches=batches))
                timed[where].append(runs[-1]["samples_per_s"])
        speed[n] = {where: statistics.median(values) for where, values in timed.items()}
        ratio[n] = speed[n]["remote"] / speed[n]["local"]
    return {"runs": runs, "samples_per_s": speed, "ratio": ratio}
