"""Pieces shared by the benchmark scripts: contention check, environment record and the closing block.

The scripts are run as ``python benchmarks/<name>.py``, which puts this directory on ``sys.path``, so they import
this module as ``from harness import ...``.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

FOREIGN_LOAD_WARNING = 0.05  # warn when other processes used more than this share of the CPU during a run


def _busy_cpu_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (Linux ``/proc/stat``), or ``None`` elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (benchmarks that launch scripts)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class ForeignLoad:
    """Share of the machine's CPU time used by other processes while the benchmark ran (contention check).

    Create it when the measurements start and call :meth:`share` when they end. The share is the machine's busy CPU
    time over that span (``/proc/stat``) minus the CPU time of this process and its finished children, divided by
    the wall time times the number of CPUs: 0 on an otherwise idle machine, 1 when other processes kept every CPU
    busy throughout.
    """

    def __init__(self) -> None:
        self.wall, self.own, self.busy = time.perf_counter(), _own_cpu_seconds(), _busy_cpu_seconds()

    def share(self, cpu_count: int) -> float | None:
        """Foreign CPU share since construction, over ``cpu_count`` CPUs; ``None`` where ``/proc/stat`` is missing."""
        busy = _busy_cpu_seconds()
        if busy is None or self.busy is None:
            return None
        foreign = (busy - self.busy) - (_own_cpu_seconds() - self.own)
        return max(0.0, foreign) / ((time.perf_counter() - self.wall) * cpu_count)


def environment(packages: Iterable[str] = ("torch",), processor: bool = False) -> dict[str, Any]:
    """What the timings depend on: ``packages``' versions, Python, platform, CPU count and torch's thread count.

    The keys are the package names (in the given order), ``python``, ``platform``, ``processor`` (only with
    ``processor=True``), ``cpu_count`` and ``num_threads``. Call it after ``torch.set_num_threads``.
    """
    env: dict[str, Any] = {name: importlib.import_module(name).__version__ for name in packages}
    env["python"] = platform.python_version()
    env["platform"] = platform.platform()
    if processor:
        env["processor"] = platform.processor()
    env["cpu_count"] = os.cpu_count() or 1
    env["num_threads"] = torch.get_num_threads()
    return env


def finish(
    results: dict[str, Any], output_path: Path, print_report: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Close a run: print the report, warn about contention, write the JSON results and say where.

    ``results`` must hold ``wall_time_s`` and may hold ``environment["foreign_cpu_share"]`` (a missing or ``None``
    share gives no warning). Returns ``results``.
    """
    print_report(results)
    foreign = results["environment"].get("foreign_cpu_share")
    if foreign is not None and foreign > FOREIGN_LOAD_WARNING:
        print(
            f"\nWARNING: other processes used {foreign:.0%} of the CPU during the run; "
            "the timings (above all the small ones) are inflated and noisy."
        )
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nWrote {output_path} ({results['wall_time_s']:.0f} s)")
    return results


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (the Mann-Whitney statistic)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)
