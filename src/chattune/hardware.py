"""Device, precision and thread choices.

`train.precision=auto` picks bf16 on CPU only where bf16 matmul is really fast: CPUs differ (one measured bf16
at 5x fp32 speed with AMX, another, AVX2 only, at 1/140 of it). The CPU's kind decides first: AMX-BF16 or
AVX512-BF16 in /proc/cpuinfo: bf16; AVX2 without them: fp32. The environment variable CHATTUNE_CPU_KIND
(avx2 | avx512_bf16 | amx | other) overrides the detected kind, for a misdetected CPU and for tests that decide as
another machine would. On any other CPU (ARM, no flags) a timed probe decides, taking the best of several short
timings of each precision so that another busy process cannot tip the choice (it slows both sides, and the best
timing is the least disturbed one). A run decides once: the choice is recorded in its chattune.json and reused on
resume and when the trained model is loaded with `auto`. On GPU: bf16 where supported, else fp16. `decide_precision`
is the one decision training, the commands that load a trained model and `chattune estimate` all ask.

The commands that run a model (chat, eval, compare's evals, serve, export) ask `decide_device_and_dtype` where to run
it and in what: `--device auto|cpu|cuda|cuda:N`, `--dtype auto|fp32|bf16|fp16`, `--device-map auto`, and what the
run recorded (the precision in its chattune.json, the device in its run.json).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch


def device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def set_cpu_threads(num_threads: int | None = None, processes: int = 1) -> int:
    """Torch threads = cores per process (oversubscription slows small matmuls a lot)."""
    n = num_threads or max(1, cpu_cores() // max(1, processes))
    torch.set_num_threads(n)
    return n


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS (Linux/glibc only).

    By default every block over 32 MB (a batch's logits, activations) gets fresh pages from the kernel on each step
    and returns them when freed, so each step pays a page fault per 4 KiB touched, several times over: in a VM
    that cost ~10x the work itself (a 218 MB bf16->fp32 copy of the logits: 60-660 ms fresh, 8 ms reused). Keeping
    the memory changes nothing about the peak, which the process reaches anyway. Returns True if applied."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1  # serve big blocks from the heap, not fresh mmaps
        return ok and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1  # and never trim the heap's top
    except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
        return False


CPU_KIND_VARIABLE = "CHATTUNE_CPU_KIND"
# What each kind of CPU this project meets does with bf16 (measured, ../DESIGN.md): AMX and AVX512-BF16 run bf16
# matmuls natively (2-5x fp32); an AVX2-only CPU emulates them (~1/100 of fp32). "other": no x86 bf16 flags
# (ARM, an unknown CPU): a timed probe decides.
CPU_KINDS = ("avx2", "avx512_bf16", "amx", "other")
_KIND_LABEL = {"amx": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "avx2": "AVX2 only"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detected_cpu_kind() -> str:
    """The CPU's kind from its flags in /proc/cpuinfo: amx, avx512_bf16, avx2 or other."""
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx2" if "avx2" in flags else "other"


def cpu_kind() -> tuple[str, str]:
    """(kind, where it came from): the `CHATTUNE_CPU_KIND` environment variable where set (for a CPU that is
    misdetected, and for tests that decide as on another machine), else what the CPU's flags say."""
    forced = os.environ.get(CPU_KIND_VARIABLE, "").strip().lower().replace("-", "_")
    if forced and forced != "auto":
        if forced not in CPU_KINDS:
            from chattune.errors import ConfigError

            raise ConfigError(f"{CPU_KIND_VARIABLE}={os.environ[CPU_KIND_VARIABLE]!r} is not a CPU kind: use one of "
                              f"{', '.join(CPU_KINDS)} (or auto, or leave it unset, to detect the CPU)")
        return forced, f"{CPU_KIND_VARIABLE}={forced}"
    return detected_cpu_kind(), "detected"


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(rounds: int = 5) -> float:
    """bf16 / fp32 matmul throughput ratio on this CPU: the best of `rounds` short timings of each (~0.2 s where
    bf16 is fast). Where the first bf16 round is already below a quarter of fp32's best — far from the 1.5x that
    would choose bf16 (a CPU without native bf16 measures ~0.01x) — the remaining rounds cannot change the choice
    and are skipped: they would cost more than a second of start-up."""

    def rates(dtype: torch.dtype, n: int, stop_below: float = 0.0):
        a = torch.randn(256, 512, dtype=dtype)
        b = torch.randn(512, 512, dtype=dtype)
        a @ b  # warm-up (kernel selection)
        best = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            for _ in range(3):
                a @ b
            best = max(best, 3 / (time.perf_counter() - t0))
            if best < stop_below:
                break
        return best

    try:
        fp32 = rates(torch.float32, rounds)
        bf16 = rates(torch.bfloat16, rounds, stop_below=fp32 / 4)
        if bf16 < fp32 / 4:
            return bf16 / fp32
        return bf16 / max(fp32, rates(torch.float32, rounds))  # fp32 timed on both sides of bf16: a burst of load
    except RuntimeError:                                          # during one side cannot favour the other
        return 0.0


def choose_precision(precision: str, device: str | None = None) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why) for `train.precision=precision` on this machine."""
    device = device or device_type()
    if device == "cuda":
        if precision != "auto":
            return precision, "set by train.precision"
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU supports bf16"
        return "fp16", "the GPU has no bf16"
    if precision == "fp16":
        return "fp32", "fp16 autocast on CPU is slow and unstable: using fp32"
    if precision != "auto":
        return precision, "set by train.precision"
    kind, source = cpu_kind()
    said = "" if source == "detected" else f" ({source})"
    if kind in ("amx", "avx512_bf16"):
        return "bf16", f"the CPU has {_KIND_LABEL[kind]} instructions{said}"
    if kind == "avx2":  # no probe: emulated bf16 measured 1/140 of fp32 on such a CPU
        why = "AVX2 only" if source == "detected" else f"AVX2 only; {source}"
        return "fp32", f"the CPU has no bf16 instructions ({why}): bf16 would be ~100x slower than fp32"
    speedup = cpu_bf16_speedup()
    if speedup >= 1.5:
        return "bf16", f"bf16 matmul measured {speedup:.1f}x fp32 on this CPU"
    return "fp32", f"bf16 matmul measured {speedup:.2f}x fp32 on this CPU (no native bf16): fp32 is faster"


def resolve_precision(precision: str, device: str | None = None) -> str:
    """auto -> fp32 | bf16 | fp16 for this machine; explicit values are checked."""
    return choose_precision(precision, device)[0]


PRECISIONS = ("fp32", "bf16", "fp16")


def decide_precision(requested: str, device: str | None = None, recorded: str | None = None,
                     recorded_why: str = "recorded by the run", gpu_bf16: bool | None = None) -> tuple[str, str]:
    """The one precision decision, (fp32 | bf16 | fp16, why) for `train.precision=requested` on `device`: training
    (train/trainer.py), the commands that load a trained model (chat, eval, serve: decide_device_and_dtype,
    where the run's recorded precision does not decide) and `chattune estimate` all ask it.

    - `recorded`: the precision a run recorded in its chattune.json (a resumed run; a trained model loaded with
      `auto`). `auto` keeps it (`recorded_why` says so), so that a busy machine or a changed probe cannot switch a
      run from bf16 to fp32 halfway; but never fp16 on a CPU, nor a value that is not a precision: those decide as
      if nothing was recorded. An explicit value is the user's choice, as below.
    - `gpu_bf16`: whether the GPU has bf16, for a GPU this process does not run on (estimate's `--gpus`, which
      assumes it does); None asks this machine's GPU.
    - otherwise `choose_precision`: an explicit value as given (fp16 on a CPU: fp32), `auto` by the GPU or by the
      CPU's kind (CHATTUNE_CPU_KIND) and, on an unknown CPU, the timed probe."""
    device = device or device_type()
    if requested == "auto" and recorded in PRECISIONS and (recorded != "fp16" or device == "cuda"):
        return recorded, recorded_why
    if requested == "auto" and device == "cuda" and gpu_bf16 is not None:
        return ("bf16", "assumed: a GPU with bf16") if gpu_bf16 else ("fp16", "assumed: a GPU without bf16")
    return choose_precision(requested, device)


# ---------------------------------------------------------------- where a trained model runs

DTYPES = ("auto", *PRECISIONS)
_PLACE = {"cpu": "a CPU", "cuda": "a GPU"}


def _config_error(message: str):
    from chattune.errors import ConfigError

    return ConfigError(message)


def parse_device(text: str) -> str:
    """`--device` as written: auto, cpu, cuda or cuda:N (any case); a ConfigError for anything else. Whether the
    device is here is `decide_device_and_dtype`'s question."""
    device = text.strip().lower()
    kind, _, index = device.partition(":")
    if device in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return device
    raise _config_error(f"--device {text}: not a device; give auto, cpu, cuda or cuda:N (N: a GPU's index, from 0)")


def _device_here(device: str) -> str:
    """`auto` -> this machine's device; `cuda`/`cuda:N` checked to be here, as cuda:N (what the model's parameters
    will say)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if not torch.cuda.is_available():
        raise _config_error(f"--device {device}: this machine has no CUDA GPU (torch sees none); use --device cpu "
                            "(or leave --device out)")
    index = int(device.partition(":")[2] or torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise _config_error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; choose one of them")
    return f"cuda:{index}"


def decide_device_and_dtype(requested_device: str = "auto", requested_dtype: str = "auto",
                            recorded: dict | None = None, device_map: str | None = None,
                            asked_by: str = "--dtype") -> tuple[str, str, str]:
    """The one decision of where a trained model runs and in what: (device, fp32 | bf16 | fp16, why) for chat,
    eval, compare's evals, serve and export. `recorded`: {"device": cpu | cuda, "precision": ...} from the run
    (run.json, chattune.json; either may be missing), or a model's own preference with its reason in "why" (the
    bundled model: fp32 on a CPU).

    - device `auto`: this machine's GPU where it has one, else the CPU; `cuda`/`cuda:N` must be here (else a
      ConfigError naming --device cpu). `device_map="auto"` spreads the model over the visible GPUs instead (device
      `cuda`): it needs a GPU (refused on a CPU-only machine, where it would only mean the CPU) and no --device.
    - dtype `auto`: the precision the run trained in, where it trained on this kind of device (or did not record
      where); otherwise what training would choose here (`decide_precision`): a GPU bf16 (fp16 without bf16), a CPU
      bf16 only where it runs bf16 natively. A bf16 run kept on an AVX2-only CPU says that fp32 is faster there.
    - an explicit dtype is kept, but fp16 on a CPU is refused: torch's CPU fp16 kernels are few and slow."""
    if requested_dtype not in DTYPES:
        raise _config_error(f"{asked_by} {requested_dtype}: not a dtype; give one of {', '.join(DTYPES)}")
    if device_map is not None:
        if requested_device != "auto":
            raise _config_error(f"--device-map {device_map} and --device {requested_device} both place the model; "
                                "give one of them")
        if not torch.cuda.is_available():
            raise _config_error(f"--device-map {device_map} spreads a model over CUDA GPUs and this machine has none; "
                                "leave --device-map out (the model then runs on the CPU)")
        device = "cuda"
    else:
        device = _device_here(parse_device(requested_device))
    kind = device.partition(":")[0]
    if requested_dtype == "fp16" and kind == "cpu":
        raise _config_error(f"{asked_by} fp16 on the CPU: torch has few fp16 kernels for CPUs (slow matmuls, missing "
                            "ops); use bf16 (on a CPU with bf16 instructions) or fp32, or auto")
    if requested_dtype != "auto":
        return device, requested_dtype, f"set by {asked_by}"
    precision, why = _auto_dtype(kind, device, recorded or {})
    return device, precision, why


def _auto_dtype(kind: str, device: str, recorded: dict) -> tuple[str, str]:
    """`--dtype auto` on a device of `kind` (cpu | cuda): see decide_device_and_dtype."""
    trained_in, trained_on = recorded.get("precision"), recorded.get("device")
    trained_on = trained_on.partition(":")[0] if isinstance(trained_on, str) else None
    if recorded.get("why") and trained_in in PRECISIONS and trained_on in (None, kind):
        return trained_in, recorded["why"]
    if trained_in in PRECISIONS and trained_on in (None, kind) and (trained_in != "fp16" or kind == "cuda"):
        why = f"the run trained in {trained_in} " + (f"on {_PLACE.get(trained_on, trained_on)}" if trained_on
                                                     else "(its chattune.json)")
        if trained_in == "bf16" and kind == "cpu" and cpu_kind()[0] == "avx2":
            why += "; this CPU has no bf16 instructions (AVX2 only): --dtype fp32 runs much faster here"
        return trained_in, why
    with torch.cuda.device(device) if ":" in device else contextlib.nullcontext():  # that GPU's bf16 support
        precision, why = decide_precision("auto", kind)
    if trained_in in PRECISIONS and trained_on and not recorded.get("why"):
        why = f"the run trained in {trained_in} on {_PLACE.get(trained_on, trained_on)}, this is {_PLACE[kind]}: {why}"
    return precision, why


def placed_on(model) -> str:
    """Where a model's parameters really are: `cpu`, `cuda:0`, or several joined by commas (--device-map auto)."""
    devices = sorted({str(p.device) for p in model.parameters()})
    return ",".join(devices) or "cpu"


def peak_memory_of(placement: str) -> float:
    """Peak memory (MB) of the devices in `placed_on`'s answer, since reset_peak_memory_of: the sum of each GPU's
    torch.cuda.max_memory_allocated, plus the process' peak RSS where a part is on the CPU."""
    return sum(peak_memory_mb(d) for d in placement.split(","))


def reset_peak_memory_of(placement: str) -> None:
    for device in placement.split(","):
        reset_peak_memory(device)


# ---------------------------------------------------------------- peak memory


def proc_status_kb(field_name: str) -> float | None:
    """A field of /proc/self/status (VmRSS, VmHWM, ...) in kB; None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: str) -> bool:
    """Start a new peak: CUDA's max_memory_allocated (`cuda`: the current GPU, `cuda:N`: that one), or on Linux the
    process' RSS high-water mark (VmHWM, reset to the current RSS by writing 5 to /proc/self/clear_refs). False where
    it cannot be reset."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: str) -> float:
    """Peak memory since the last reset_peak_memory (or since the process started): torch.cuda.max_memory_allocated
    on GPU (`cuda`: the current one, `cuda:N`: that one), peak RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # torch_dtype's inverse
