"""Multi-GPU helpers (DistributedDataParallel through torchrun): which process this is (and its device), work done
by the main process only, shares of a dataset, and rows or losses gathered across processes. With one process
(world_size 1) every helper is the plain single-process computation."""

import datetime
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

from core.devices import resolve_device


def check_replicas_in_sync(modules, world_size, epoch_num):
    """DDP keeps the processes' weights equal by averaging their gradients before each (identical) optimizer
    step. Checked once per epoch on checksums of every weight, so that a module trained outside DDP stops
    the run instead of silently training different models."""
    checksums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                             for module in modules for p in module.parameters()])
    gathered = [torch.empty_like(checksums) for _ in range(world_size)]
    dist.all_gather(gathered, checksums)
    if not all(torch.allclose(other, checksums, rtol=1e-6, atol=1e-9) for other in gathered):
        raise RuntimeError(f"Epoch {epoch_num}: the weights of the {world_size} DDP processes differ")
    logging.info(f"Epoch {epoch_num:02d}: the weights (model, head) of the {world_size} processes are identical")


def setup_distributed(device):
    """(world_size, rank, device) of this process: DDP through torchrun (one process per GPU, NCCL, or gloo on the
    CPU), else (1, 0, device). The device is the process's GPU under NCCL, else the --device given, resolved."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world_size > 1:
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return world_size, rank, resolve_device(device)


def end_distributed(world_size):
    """The counterpart of setup_distributed, at the end of a run."""
    if world_size > 1:
        dist.destroy_process_group()


MAIN_ONLY_TIMEOUT = datetime.timedelta(hours=12)


def computed_on_main(compute, world_size=1, is_main=True):
    """compute() run by the main process only (a file it writes: --preresize_cache), its result sent to every process.
    The others wait for it in a gloo group of its own whose timeout is MAIN_ONLY_TIMEOUT, not the default group's
    (10 minutes with NCCL), so that hours of work on the main process do not kill the job."""
    if world_size == 1:
        return compute()
    group = dist.new_group(backend="gloo", timeout=MAIN_ONLY_TIMEOUT)
    result = [compute() if is_main else None]
    dist.broadcast_object_list(result, src=0, group=group)
    dist.destroy_process_group(group)
    return result[0]


GATHER_CHUNK_ROWS = 65536  # rows of every process gathered at a time: 128 MB a process at 512-D


def shard(indices, world_size=1, rank=0):
    """This process's contiguous part of indices (a range or a list): equal parts, the first ranks taking one more
    when world_size does not divide their number."""
    size, extra = divmod(len(indices), world_size)
    start = rank * size + min(rank, extra)
    return indices[start: start + size + (rank < extra)]


def all_gather_rows(values, rows, total, world_size, device="cpu", chunk_rows=GATHER_CHUNK_ROWS):
    """The array [total, D] whose rows every DDP process computed a part of: each gives its row numbers (int64 [n])
    and an array holding them at those rows (values, None when n is 0), every process gets all of them. Gathered
    chunk_rows at a time into the array returned, so that the transient buffers hold world_size x chunk_rows rows,
    not the whole database again (a million 512-D descriptors are 2 GB); each part is padded to the longest one
    (all_gather needs equal sizes) and sent on device (NCCL needs the GPU)."""
    shape = torch.tensor([len(rows), 0 if values is None else values.shape[1]], device=device)
    shapes = [torch.zeros_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    counts, dimension = [int(s[0]) for s in shapes], max(int(s[1]) for s in shapes)
    gathered = np.empty((total, dimension), dtype=np.float32)
    for start in range(0, max(counts), chunk_rows):
        part = rows[start:start + chunk_rows]
        padded_rows = torch.full((chunk_rows,), -1, dtype=torch.int64, device=device)
        padded_values = torch.zeros(chunk_rows, dimension, dtype=torch.float32, device=device)
        padded_rows[:len(part)] = torch.as_tensor(part, dtype=torch.int64)
        if len(part):
            padded_values[:len(part)] = torch.as_tensor(values[part])
        gathered_rows = [torch.empty_like(padded_rows) for _ in range(world_size)]
        gathered_values = [torch.empty_like(padded_values) for _ in range(world_size)]
        dist.all_gather(gathered_rows, padded_rows)
        dist.all_gather(gathered_values, padded_values)
        for rank_rows, rank_values in zip(gathered_rows, gathered_values):
            kept = rank_rows >= 0
            gathered[rank_rows[kept].cpu().numpy()] = rank_values[kept].cpu().numpy()
    return gathered


def mean_over_processes(records, world_size=1, device="cpu"):
    """records (PendingLosses.read: a list of {name: value}, the same names on every process) averaged term by term
    over the DDP processes: every process logs the same losses, and a non-finite loss on one of them makes the mean
    non-finite on all, so that checkpoints.check_finite_losses stops them all at the same iteration."""
    if world_size == 1 or not records:
        return records
    values = torch.tensor([value for record in records for value in record.values()], dtype=torch.float64,
                          device=device)
    dist.all_reduce(values)
    values = (values / world_size).cpu().tolist()
    averaged, position = [], 0
    for record in records:
        averaged.append(dict(zip(record, values[position:position + len(record)])))
        position += len(record)
    return averaged
