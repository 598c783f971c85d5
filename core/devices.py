"""The device a run computes on: which one (--device), its mixed precision, its peak memory."""

import contextlib
import resource

import torch

from core.errors import UserError


def resolve_device(device):
    """'auto' -> 'cuda' when available, else 'cpu'; an explicit 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was requested but PyTorch sees no CUDA GPU: use --device cpu (or auto)")
    return device


def autocast_context(device, amp):
    """Mixed precision (--amp, --eval_amp): fp16 or bf16 on CUDA, bf16 on the CPU (whose fp16 is no faster than
    fp32: parser.implicit_settings says it has no effect there); nothing with amp none."""
    if amp == "none":
        return contextlib.nullcontext()
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
    if amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_mb(device):
    """The peak memory of this process so far, in MB: the tensors allocated on a CUDA device
    (torch.cuda.max_memory_allocated), else the peak resident memory of the process (RSS, loader workers apart)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # KB on Linux
