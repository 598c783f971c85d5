"""Helpers shared by the training and evaluation scripts: logging, seeds and RNG states, devices, memory."""

import ctypes
import ctypes.util
import datetime
import logging
import os
import random
import sys
import traceback

import numpy as np
import torch

from core.errors import UserError, user_error_message


def setup_logging(output_folder, console="info", info_filename="info.log", debug_filename="debug.log",
                  interrupt_message=None):
    """Logs to output_folder/info.log (info and above), debug.log (everything) and the console.
    Files are opened in append mode: nothing a user has is ever overwritten."""
    os.makedirs(output_folder, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    formatter = logging.Formatter("%(asctime)s   %(message)s", "%Y-%m-%d %H:%M:%S")
    for filename, level in ((info_filename, logging.INFO), (debug_filename, logging.DEBUG)):
        if filename is not None:
            handler = logging.FileHandler(os.path.join(output_folder, filename), mode="a")
            handler.setLevel(level)
            handler.setFormatter(formatter)
            root.addHandler(handler)
    if console is not None:
        handler = logging.StreamHandler(sys.stdout)
        handler.setLevel(getattr(logging, console.upper()))
        handler.setFormatter(formatter)
        handler.addFilter(lambda record: not getattr(record, "file_only", False))
        root.addHandler(handler)
    for noisy in ("PIL", "matplotlib", "urllib3", "timm", "httpx", "huggingface_hub", "filelock", "torch._dynamo",
                  "torch._inductor", "torch.fx", "torch._subclasses"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def log_exception(exc_type, value, tb):
        """A bug shows its traceback; an error the user can fix shows one clear line (exit code 1), and Ctrl-C
        one line from interrupt_message() (e.g. how to resume); their tracebacks only go to debug.log."""
        full_traceback = "".join(traceback.format_exception(exc_type, value, tb))
        message = user_error_message(value)
        if isinstance(value, KeyboardInterrupt):
            message = interrupt_message() if interrupt_message else "interrupted (Ctrl-C)"
        if message is None:
            logging.error(full_traceback)
            return
        logging.debug(full_traceback, extra={"file_only": True})
        details = f" (traceback in {os.path.join(output_folder, debug_filename)})" if debug_filename else ""
        logging.error(f"{'INTERRUPTED' if isinstance(value, KeyboardInterrupt) else 'ERROR'}: {message}{details}")
    sys.excepthook = log_exception


def make_deterministic(seed=0):
    """Seeds every RNG. On the CPU this makes runs bit-exact; on CUDA cuDNN autotuning stays on (speed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def reuse_freed_memory(megabytes=256):
    """Lets glibc's malloc keep freed blocks of up to `megabytes` for reuse. By default a freed CPU tensor
    of more than a few MB goes back to the system and the next one page-faults its memory anew: a quarter of
    the time of the batched augmentation at 512 px, and more on a busy 2-core machine (PyTorch has no
    caching allocator on the CPU). Loader workers forked afterwards inherit it; elsewhere than glibc, nothing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(GLIBC_M_MMAP_THRESHOLD, megabytes << 20)
        libc.mallopt(GLIBC_M_TRIM_THRESHOLD, 4 * megabytes << 20)
    except (OSError, AttributeError, TypeError):  # no C library found, or one without mallopt (macOS, musl)
        pass


def get_rng_states():
    """This process's RNG states: Python, NumPy, torch's CPU one and, on CUDA, its current device's only (with
    DDP each process owns one GPU; reading the others' would create a CUDA context on each of them)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_state = states["cuda"]  # a list of every device's in the checkpoints of the first release
        torch.cuda.set_rng_state(cuda_state[0] if isinstance(cuda_state, list) else cuda_state)


def resolve_device(device):
    """'auto' -> 'cuda' when available, else 'cpu'; an explicit 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was requested but PyTorch sees no CUDA GPU: use --device cpu (or auto)")
    return device


def move_with_optimizer(module, optimizer, device):
    """module and the state of its optimizer moved to device (a head trains on the GPU only in its group's epochs)."""
    move_optimizer_to_device(optimizer, device)
    return module.to(device)


def move_optimizer_to_device(optimizer, device):
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                state[key] = value.to(device)


def warn_ineffective_flags(args):
    """Says once which flags given have no effect on this device, instead of ignoring them silently."""
    on_cpu = not args.device.startswith("cuda")
    ineffective = [f"--{flag} {getattr(args, flag)}" for flag in ("amp", "eval_amp")
                   if on_cpu and getattr(args, flag, "none") != "none"]
    ineffective += ["--decode_on_gpu"] if on_cpu and getattr(args, "decode_on_gpu", False) else []
    if ineffective:
        logging.warning(f"{', '.join(ineffective)}: no effect on the CPU (it runs in fp32, decoding on the CPU)")


def peak_memory_mb(device):
    """The peak memory of this process so far, in MB: the tensors allocated on a CUDA device
    (torch.cuda.max_memory_allocated), else the peak resident memory of the process (RSS, loader workers apart)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # KB on Linux


def duration_to_str(seconds):
    """'45 s', '12 min', '3.4 h': a duration as a person reads it."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


class PendingLosses:
    """The loss terms of each iteration, kept on the device and read in one go (each read waits for the device)."""

    def __init__(self):
        self.pending = []

    def add(self, **terms):
        self.pending.append({name: value.detach() for name, value in terms.items() if value is not None})

    def read(self):
        """The terms of the iterations since the last read, as floats: a list of {name: value}."""
        if not self.pending:
            return []
        names = [list(terms) for terms in self.pending]
        values = torch.stack([value.float() for terms in self.pending for value in terms.values()]).cpu().tolist()
        self.pending.clear()
        read, position = [], 0
        for keys in names:
            read.append(dict(zip(keys, values[position:position + len(keys)])))
            position += len(keys)
        return read


def mean_terms(records):
    """{name: mean over the records that have it} of a list of {name: value}."""
    names = dict.fromkeys(name for record in records for name in record)
    return {name: float(np.mean([record[name] for record in records if name in record])) for name in names}


def check_replicas_in_sync(modules, world_size, epoch_num):
    """DDP keeps the processes' weights equal by averaging their gradients before each (identical) optimizer
    step. Checked once per epoch on checksums of every weight, so that a module trained outside DDP stops
    the run instead of silently training different models."""
    import torch.distributed as dist
    checksums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                             for module in modules for p in module.parameters()])
    gathered = [torch.empty_like(checksums) for _ in range(world_size)]
    dist.all_gather(gathered, checksums)
    if not all(torch.allclose(other, checksums, rtol=1e-6, atol=1e-9) for other in gathered):
        raise RuntimeError(f"Epoch {epoch_num}: the weights of the {world_size} DDP processes differ")
    logging.info(f"Epoch {epoch_num:02d}: the weights (model, head) of the {world_size} processes are identical")


def setup_distributed(args):
    """(world_size, rank) of this process: DDP through torchrun (one process per GPU, NCCL, or gloo on the CPU),
    else (1, 0). Sets args.device to the process's GPU, or resolves --device auto."""
    import torch.distributed as dist
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world_size > 1:
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    args.device = resolve_device(args.device)
    return world_size, rank


def log_arguments(args, output_folder):
    """The command, every flag, where the outputs go, then log_implicit_settings."""
    logging.info(" ".join(sys.argv))
    logging.info(f"Arguments: {args}")
    logging.info(f"The outputs are being saved in {output_folder}")
    log_implicit_settings(args)


def log_implicit_settings(args):
    """What was not given as such: the seed drawn for --seed -1, the flags read beside --resume_model, the recipe
    in force, the flags with no effect on this device."""
    if getattr(args, "seed_drawn", False):
        logging.info(f"--seed -1: drew the seed {args.seed} (pass --seed {args.seed} to repeat this run)")
    for flag, value in args.flags_from_checkpoint.items():
        logging.info(f"--{flag} {value}: taken from the args.json beside --resume_model {args.resume_model}")
    if hasattr(args, "recipe"):
        logging.info(f"Recipe {args.recipe}: BatchNorm statistics frozen: {args.freeze_bn_stats}")
    warn_ineffective_flags(args)


def resume_hint(checkpoint_path, argv=None):
    """What Ctrl-C prints: the last good checkpoint and the command that continues from it."""
    if not os.path.exists(checkpoint_path):
        return f"no checkpoint was written yet ({checkpoint_path}): start the run again"
    argv = sys.argv if argv is None else argv
    flags = [a for i, a in enumerate(argv) if "--resume_train" not in (a, argv[i - 1] if i else "")]
    return (f"the last good checkpoint is {checkpoint_path}; continue with: python {' '.join(flags)} "
            f"--resume_train {checkpoint_path}")


MAIN_ONLY_TIMEOUT = datetime.timedelta(hours=12)


def computed_on_main(compute, world_size=1, is_main=True):
    """compute() run by the main process only (a file it writes: --preresize_cache), its result sent to every process.
    The others wait for it in a gloo group of its own whose timeout is MAIN_ONLY_TIMEOUT, not the default group's
    (10 minutes with NCCL), so that hours of work on the main process do not kill the job."""
    if world_size == 1:
        return compute()
    import torch.distributed as dist
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
    import torch.distributed as dist
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
    import torch.distributed as dist
    values = torch.tensor([value for record in records for value in record.values()], dtype=torch.float64,
                          device=device)
    dist.all_reduce(values)
    values = (values / world_size).cpu().tolist()
    averaged, position = [], 0
    for record in records:
        averaged.append(dict(zip(record, values[position:position + len(record)])))
        position += len(record)
    return averaged
