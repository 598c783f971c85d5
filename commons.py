"""Helpers shared by the scripts: logging, output folders, seeds and RNG states, atomic writes, devices."""

import ctypes
import ctypes.util
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import traceback
from datetime import datetime

import numpy as np
import torch

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
UMASK = os.umask(0o022)  # read once at import (os.umask has no getter), then restored
os.umask(UMASK)
NEW_FILE_MODE = 0o666 & ~UMASK  # the permissions open() would give a new file


def make_unique_folder(parent, name):
    """Creates parent/name, or parent/name_1, _2... if it exists: two runs started in the same second never
    share (or overwrite) a folder. os.makedirs(exist_ok=False) is atomic, so concurrent runs cannot race."""
    os.makedirs(parent, exist_ok=True)
    candidate, suffix = os.path.join(parent, name), 0
    while True:
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = os.path.join(parent, f"{name}_{suffix}")


def make_output_folder(save_dir, logs_root="logs"):
    return make_unique_folder(os.path.join(logs_root, save_dir), datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))


def setup_logging(output_folder, console="info", info_filename="info.log", debug_filename="debug.log"):
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
    for noisy in ("PIL", "matplotlib", "urllib3", "timm", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def log_exception(exc_type, value, tb):
        """A bug shows its traceback; an error the user can fix shows one clear line (exit code 1), its
        traceback only goes to debug.log."""
        full_traceback = "".join(traceback.format_exception(exc_type, value, tb))
        message = user_error_message(value)
        if message is None:
            logging.error(full_traceback)
        else:
            logging.debug(full_traceback, extra={"file_only": True})
            details = f" (traceback in {os.path.join(output_folder, debug_filename)})" if debug_filename else ""
            logging.error(f"ERROR: {message}{details}")
    sys.excepthook = log_exception


def user_error_message(exception):
    """The message of an error the user can fix (dataset, image, checkpoint or weights file, diverged loss),
    None for anything else. An exception raised in a DataLoader worker comes back with the worker's traceback
    in its message, ending with the line "module.Class: original message": only the message is kept."""
    from datasets.dataset_utils import DatasetError  # late imports: no cycle if these modules ever use commons
    from datasets.image_loading import ImageLoadError
    from model.backbones import PretrainedWeightsUnavailable
    from model.network import CheckpointError
    if not isinstance(exception, (DatasetError, ImageLoadError, CheckpointError, PretrainedWeightsUnavailable,
                                  FloatingPointError)):
        return None
    message = str(exception)
    if "\nOriginal Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return message


def git_commit():
    """The project's git commit (with '-dirty' when there are uncommitted changes), or 'unknown'."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def test_set_label(folder):
    """'sf_xs/val' for .../sf_xs/val: a test set's dataset and split, unique where its basename is not."""
    return "/".join(os.path.normpath(os.path.abspath(folder)).split(os.sep)[-2:])


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


def atomic_write(path, write_function, mode="wb"):
    """Writes through a temporary file in the same folder, then renames it over path: a kill at any moment
    leaves either the previous file or the new one, never a truncated one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    file_descriptor, temporary_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(temporary_path, NEW_FILE_MODE)  # mkstemp's 0600 would hide results from other users
        with os.fdopen(file_descriptor, mode) as file:
            write_function(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary_path, path)
    except BaseException:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)
        raise
    directory_descriptor = os.open(folder, os.O_RDONLY)
    try:  # the rename itself survives a power cut only once the folder is synced
        os.fsync(directory_descriptor)
    finally:
        os.close(directory_descriptor)


def atomic_torch_save(obj, path):
    atomic_write(path, lambda file: torch.save(obj, file))


def atomic_json_dump(obj, path):
    atomic_write(path, lambda file: json.dump(obj, file, indent=2, default=str), mode="w")


def atomic_copy(source, destination):
    with open(source, "rb") as source_file:
        atomic_write(destination, lambda file: shutil.copyfileobj(source_file, file))


def append_jsonl(record, path):
    """One JSON object per line; appending a line is safe for logs that must never be overwritten."""
    with open(path, "a") as file:
        file.write(json.dumps(record, default=float) + "\n")


def resolve_device(device):
    """'auto' -> 'cuda' when available, else 'cpu'; an explicit 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but PyTorch sees no CUDA GPU: use --device cpu (or auto)")
    return device


def move_optimizer_to_device(optimizer, device):
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                state[key] = value.to(device)
