"""Helpers shared by the training and evaluation scripts: logging, seeds and RNG states, devices, memory."""

import ctypes
import ctypes.util
import logging
import os
import random
import sys
import traceback

import numpy as np
import torch

from core.errors import user_error_message


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


def duration_to_str(seconds):
    """'45 s', '12 min', '3.4 h': a duration as a person reads it."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


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
