"""What the CPU computes natively, read from the operating system without importing torch (parser.py says it at the
start of a run): whether bfloat16 has units of its own. Where it has none, oneDNN emulates bfloat16 and a network in
bf16 autocast runs several times slower than in fp32 (docs/speed.md has the figures)."""

import platform
import subprocess

X86_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags: Intel Sapphire Rapids+, AMD Zen 4+, Cooper Lake
ARM_BF16_FEATURE = "bf16"  # /proc/cpuinfo Features of Armv8.6 cores (Graviton 3+, Neoverse V1+)


def cpuinfo_words(path="/proc/cpuinfo"):
    """The words of the 'flags' (x86) and 'Features' (Arm) lines of the first processor; None where the file is not
    there (macOS, Windows)."""
    try:
        with open(path) as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return set()


def bf16_units(path="/proc/cpuinfo"):
    """The CPU's bfloat16 instruction sets (a tuple, empty when it has none), or None when the system does not say."""
    words = cpuinfo_words(path)
    if words is not None:
        return tuple(flag for flag in X86_BF16_FLAGS if flag in words) + \
            ((ARM_BF16_FEATURE,) if ARM_BF16_FEATURE in words else ())
    if platform.system() == "Darwin":  # Apple M2 and later
        try:
            found = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                   timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return ("FEAT_BF16",) if found == "1" else ()
    return None


def bf16_note(flags):
    """One line on bfloat16 on this CPU for a run on the CPU (flags: the --amp/--eval_amp given, e.g. ['--amp bf16']):
    its units and what bf16 does here, with the figures measured; a warning (True) where bf16 is asked for on a CPU
    that must emulate it."""
    units = bf16_units()
    asked = ", ".join(flags) if flags else "--amp bf16 / --eval_amp bf16"
    if units:
        return False, (f"CPU: computes bfloat16 natively ({', '.join(units)}): {asked} "
                       f"{'runs' if flags else 'can run'} the network in bf16 autocast: 1.9x faster than fp32 on an "
                       f"AMD EPYC Zen 4, but 0.85x (training) and 0.75x (inference) on a Xeon whose avx512_bf16 "
                       f"comes without AMX; the ours_bf16 column of benchmarks/bench.py measures it here "
                       f"(docs/speed.md)")
    if units is None:
        return False, f"CPU: this system does not say whether the CPU computes bfloat16 natively ({asked}: measure " \
                      f"with benchmarks/bench.py --amp bf16)"
    if flags:
        return True, (f"CPU: no bfloat16 units (no avx512_bf16, amx_bf16): {asked} is emulated here, several times "
                      f"slower than fp32 (training and inference 3x slower with oneDNN's bf16 instructions switched "
                      f"off on a Xeon; docs/speed.md): use --amp none / --eval_amp none on this CPU")
    return False, "CPU: no bfloat16 units (no avx512_bf16, amx_bf16): fp32 is the fast precision here"
