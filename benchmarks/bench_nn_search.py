"""Chunked nearest-neighbour search against a naive full ``torch.cdist``, on CPU.

    python benchmarks/bench_nn_search.py [--quick]

For each size (``R`` training images x ``Q`` samples, flattened 64x64x3 = 12,288 values, uniform in ``[0, 1)``,
float32) both methods find the 2 nearest training images of every sample:

* **chunked**: :func:`diffusers_hold.metrics.nearest_neighbours` (blocks of ``query_chunk_size x chunk_size``,
  running top-k, exact recomputation of the selected distances, input validation included);
* **naive**: ``torch.cdist(samples, train).topk(2, largest=False)``, which materialises the whole ``Q x R`` matrix.
  It only runs where its estimated footprint fits under ``--naive-limit-gb``.

Reported per method: wall time (median over repetitions), pairs/s (``Q * R / time``) and the peak extra resident
memory during the call (RSS sampled every millisecond from ``/proc/self/statm`` minus the RSS just before the call;
``tracemalloc`` does not see torch's allocations). glibc's malloc is set to return every block of 64 KiB or more to
the system on ``free`` so that RSS follows live memory between calls. The input sets are allocated before timing and
are not counted, and both methods run once on small inputs first. ``--quick`` runs three smaller sizes twice each
(under a minute on 2 cores). Results go to ``benchmarks/results/nn_search.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import ForeignLoad, environment, finish

from diffusers_hold.metrics import nearest_neighbours

DIM = 64 * 64 * 3
FULL_SIZES = ((2000, 500), (5000, 1000), (20000, 2000))  # (train R, samples Q)
QUICK_SIZES = ((1000, 200), (4000, 400), (8000, 800))
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "nn_search.json"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Three smaller sizes, two repetitions: under a minute.")
    parser.add_argument("--sizes", type=str, default=None, help="Comma-separated RxQ sizes, e.g. 2000x500,8000x1000.")
    parser.add_argument("--dim", type=int, default=DIM, help="Values per flattened image (default 64*64*3).")
    parser.add_argument("--chunk-size", type=int, default=1024, help="Training images per block (chunked search).")
    parser.add_argument("--query-chunk-size", type=int, default=1024, help="Samples per block (chunked search).")
    parser.add_argument("--reps", type=int, default=None, help="Timed repetitions per method (default 2 quick, 3).")
    parser.add_argument(
        "--naive-limit-gb", type=float, default=None, help="Skip the naive search above this estimated footprint."
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Where to write the JSON results.")
    args = parser.parse_args(argv)
    if args.sizes:
        args.sizes = tuple(tuple(int(v) for v in item.lower().split("x")) for item in args.sizes.split(","))
    else:
        args.sizes = QUICK_SIZES if args.quick else FULL_SIZES
    if args.reps is None:
        args.reps = 2 if args.quick else 3
    if args.naive_limit_gb is None:
        args.naive_limit_gb = 0.5 * _available_bytes() / 2**30
    return args


# ------------------------------------------------------------------------------------------------------ memory
def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _return_freed_memory_to_the_system() -> bool:
    """glibc: serve every block >= 64 KiB with mmap (unmapped on free) and trim the heap eagerly."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 128 * 1024))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a background thread."""

    def __init__(self, interval: float = 1e-3):
        self.interval = interval
        self.peak_extra = 0

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.peak_extra = self.peak - self.base


# ------------------------------------------------------------------------------------------------------ methods
def chunked(samples: torch.Tensor, train: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    _, index = nearest_neighbours(
        samples, train, 2, chunk_size=args.chunk_size, query_chunk_size=args.query_chunk_size, device="cpu"
    )
    return index


def naive(samples: torch.Tensor, train: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    return torch.cdist(samples, train).topk(2, dim=1, largest=False).indices


def naive_footprint(n_train: int, n_samples: int, dim: int) -> int:
    """Estimated extra bytes of the naive search (float32): ``cdist`` copies both inputs with two extra columns, then
    holds the distance matrix and one temporary of its size."""
    return 4 * ((n_train + n_samples) * (dim + 2) + 2 * n_train * n_samples)


def warm_up(args: argparse.Namespace) -> None:
    """One small call of each method first, so one-time allocations (BLAS buffers, caches) are not measured."""
    gen = torch.Generator().manual_seed(0)
    train, samples = torch.rand(256, args.dim, generator=gen), torch.rand(64, args.dim, generator=gen)
    chunked(samples, train, args)
    naive(samples, train, args)


def measure(fn: Callable[[], torch.Tensor], reps: int) -> tuple[dict[str, Any], torch.Tensor]:
    times, peaks = [], []
    result = None
    for _ in range(reps):
        with PeakRSS() as memory:
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
        times.append(elapsed)
        peaks.append(memory.peak_extra)
    entry = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "samples_s": times,
        "peak_extra_rss_bytes": max(peaks),
    }
    return entry, result


def bench_size(n_train: int, n_samples: int, args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(n_train + n_samples)
    train = torch.rand(n_train, args.dim, generator=gen)
    samples = torch.rand(n_samples, args.dim, generator=gen)
    pairs = n_train * n_samples
    entry: dict[str, Any] = {
        "train": n_train,
        "samples": n_samples,
        "dim": args.dim,
        "pairs": pairs,
        "input_bytes": (n_train + n_samples) * args.dim * 4,
        "naive_distance_matrix_bytes": 4 * pairs,
    }
    result, chunked_index = measure(lambda: chunked(samples, train, args), args.reps)
    result["pairs_per_s"] = pairs / result["median_s"]
    entry["chunked"] = result
    footprint = naive_footprint(n_train, n_samples, args.dim)
    if footprint > args.naive_limit_gb * 2**30:
        limit = args.naive_limit_gb
        entry["naive"] = {"skipped": f"estimated footprint {footprint / 2**30:.1f} GiB > {limit:.1f} GiB"}
        return entry
    result, naive_index = measure(lambda: naive(samples, train, args), args.reps)
    result["pairs_per_s"] = pairs / result["median_s"]
    entry["naive"] = result
    entry["nearest_index_agreement"] = float((naive_index[:, 0] == chunked_index[:, 0]).double().mean())
    entry["time_chunked_over_naive"] = entry["chunked"]["median_s"] / result["median_s"]
    entry["memory_chunked_over_naive"] = entry["chunked"]["peak_extra_rss_bytes"] / max(
        result["peak_extra_rss_bytes"], 1
    )
    return entry


# ------------------------------------------------------------------------------------------------------ report
def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def print_report(results: dict[str, Any]) -> None:
    env = results["environment"]
    print(
        f"\ntorch {env['torch']}, {env['num_threads']} threads ({env['cpu_count']} CPUs), "
        f"{'quick' if results['quick'] else 'full'} run, D = {results['dim']}, float32, k = 2, "
        f"chunks {results['query_chunk_size']} x {results['chunk_size']}"
    )
    header = (
        f"  {'R x Q':>13}  {'method':<8}{'time':>10}{'Mpairs/s':>10}{'peak extra RSS':>16}"
        f"{'t ratio':>9}{'mem ratio':>11}{'agree':>7}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for entry in results["sizes"]:
        label = f"{entry['train']} x {entry['samples']}"
        for method in ("chunked", "naive"):
            res = entry[method]
            if "skipped" in res:
                print(f"  {label:>13}  {method:<8}skipped: {res['skipped']}")
                continue
            line = (
                f"  {label:>13}  {method:<8}{res['median_s']:>9.3f}s{res['pairs_per_s'] / 1e6:>10.2f}"
                f"{fmt_bytes(res['peak_extra_rss_bytes']):>16}"
            )
            if method == "chunked" and "time_chunked_over_naive" in entry:
                line += (
                    f"{entry['time_chunked_over_naive']:>9.2f}{entry['memory_chunked_over_naive']:>11.3f}"
                    f"{entry['nearest_index_agreement']:>7.3f}"
                )
            print(line)
    print("  (ratios are chunked / naive; 'agree' is the fraction of samples with the same nearest training index)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cpu_count = os.cpu_count() or 1
    torch.set_num_threads(cpu_count)
    malloc_tuned = _return_freed_memory_to_the_system()
    start = time.perf_counter()
    foreign_load = ForeignLoad()
    results: dict[str, Any] = {
        "benchmark": "nn_search",
        "quick": args.quick,
        "dim": args.dim,
        "k": 2,
        "chunk_size": args.chunk_size,
        "query_chunk_size": args.query_chunk_size,
        "reps": args.reps,
        "naive_limit_gb": args.naive_limit_gb,
        "malloc_returns_freed_memory": malloc_tuned,
        "environment": environment(("torch", "diffusers_hold")),
        "sizes": [],
    }
    warm_up(args)
    for n_train, n_samples in args.sizes:
        print(f"{n_train} train x {n_samples} samples ...", flush=True)
        results["sizes"].append(bench_size(n_train, n_samples, args))
    results["wall_time_s"] = time.perf_counter() - start
    foreign = foreign_load.share(cpu_count)
    if foreign is not None:  # the key is left out where /proc/stat is missing
        results["environment"]["foreign_cpu_share"] = foreign
    return finish(results, args.output, print_report)


if __name__ == "__main__":
    main()
