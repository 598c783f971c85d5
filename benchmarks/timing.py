"""Timing a loop of steps as the benchmarks do: after warm-up steps, with the device synchronised, in images/s and
CPU ms per image (this process and its loader workers: steadier than images/s on a shared machine)."""

import os
import resource
import time

import torch


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cpu_seconds(pids):
    """User + system CPU seconds of this process and of the given child processes (the loader workers)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):  # not Linux, or the worker ended: counted as 0
            pass
    return total


def timed_loop(loader, step, iterations, device, batch_size, warmup):
    """images/s and CPU ms per image of `iterations` steps after `warmup` ones (worker start-up, autotuning)."""
    iterator = iter(loader)
    for _ in range(warmup):
        step(next(iterator))
    synchronize(device)
    worker_pids = [w.pid for w in getattr(iterator, "_workers", [])]
    start_time, start_cpu = time.perf_counter(), cpu_seconds(worker_pids)
    for _ in range(iterations):
        step(next(iterator))
    synchronize(device)
    elapsed, cpu = time.perf_counter() - start_time, cpu_seconds(worker_pids) - start_cpu
    del iterator
    images = iterations * batch_size
    return {"images_per_s": images / elapsed, "cpu_ms_per_image": cpu / images * 1000}
