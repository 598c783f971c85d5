"""Helpers shared by the training and evaluation scripts: seeds and RNG states, memory, durations."""

import ctypes
import ctypes.util
import logging
import random

import numpy as np
import torch



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


def move_with_optimizer(module, optimizer, device):
    """module and the state of its optimizer moved to device (a head trains on the GPU only in its group's epochs)."""
    move_optimizer_to_device(optimizer, device)
    return module.to(device)


def move_optimizer_to_device(optimizer, device):
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                state[key] = value.to(device)


def log_time_left(seconds, first_step, last_step, steps_left):
    """How long the steps_left remaining iterations of a training should take at the speed of iterations
    first_step..last_step, which took seconds (validations not counted)."""
    seconds_per_step = seconds / max(1, last_step - first_step + 1)
    if steps_left:
        logging.info(f"{seconds_per_step:.3f} s per iteration over iterations {first_step}-{last_step}: about "
                     f"{duration_to_str(seconds_per_step * steps_left)} of training left for the {steps_left} "
                     f"remaining iterations, validations not counted")


def duration_to_str(seconds):
    """'45 s', '12 min', '3.4 h': a duration as a person reads it."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"
