"""The tests whose outcome depends on the CPU (the precision `auto` picks, the kernels torch and chattune run) pass
as each CPU kind this project meets would run them, on whatever machine runs the suite.

Each kind runs the `cpu_kind`-marked tests in a fresh process with `CHATTUNE_CPU_KIND` set, so chattune decides
as on that CPU (AVX2: fp32; AVX512-BF16 and AMX: bf16). The AVX2 run also limits torch to its AVX2 kernels
(`ATEN_CPU_CAPABILITY`, oneDNN's `ONEDNN_MAX_CPU_ISA`) and chattune's block-weight kernel to its AVX2 one
(`CHATTUNE_BLOCK_KERNEL`), which any x86 CPU with more can run: a change that only
breaks on an AVX2-only CPU fails here. The bf16 kinds cannot be given bf16 instructions a CPU lacks: on an
AVX2-only machine they run chattune's bf16 decisions with emulated bf16 kernels (slower, the same results to
bf16's precision), which the tiny models these tests use make affordable.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chattune import hardware
from chattune.errors import ConfigError

# The AVX2 run gets an inductor cache of its own: torch's compiled-kernel cache does not key on
# ATEN_CPU_CAPABILITY, and kernels compiled beside the CPU's full ISA gave NaN losses under AVX2-only aten kernels.
KINDS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "TORCHINDUCTOR_CACHE_DIR": "{tmp}/inductor",
             "CHATTUNE_BLOCK_KERNEL": "avx2"},
    "avx512_bf16": {},
    "amx": {},
}


def _kinds_this_suite_does_not_already_run() -> list[str]:
    """The suite itself runs the marked tests as the kind this process runs as (the CPU's own, or
    CHATTUNE_CPU_KIND's): a second run as that kind would repeat the same decisions on the same kernels (103 s of
    one full run), so it is left out and the other kinds run."""
    try:
        own = hardware.cpu_kind()[0]
    except ConfigError:  # a bad CHATTUNE_CPU_KIND: every kind runs, and the marked tests report the variable
        own = None
    return [kind for kind in KINDS if kind != own]


@pytest.mark.parametrize("kind", _kinds_this_suite_does_not_already_run())
def test_cpu_kind_sensitive_tests_pass_as_each_cpu_kind(kind, tmp_path):
    tests = Path(__file__).parent
    env = {**os.environ, hardware.CPU_KIND_VARIABLE: kind,
           **{k: v.format(tmp=tmp_path) for k, v in KINDS[kind].items()}}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cpu_kind", "-p", "no:cacheprovider",
                        "--basetemp", str(tmp_path / "t"), str(tests)], cwd=tests.parent, env=env,
                       capture_output=True, text=True, timeout=1800)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0, f"CHATTUNE_CPU_KIND={kind}: {summary}\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    assert " passed" in summary and "failed" not in summary, summary


@pytest.mark.cpu_kind
def test_the_marked_tests_see_the_kind_they_run_as():
    """Inside a per-kind run, chattune's decision is that kind's, and the AVX2 run has torch's AVX2 kernels;
    outside, the CPU's own."""
    kind, source = hardware.cpu_kind()
    forced = os.environ.get(hardware.CPU_KIND_VARIABLE)
    if forced:
        assert (kind, source) == (forced, f"CHATTUNE_CPU_KIND={forced}")
        if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
            import torch

            assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    else:
        assert (kind, source) == (hardware.detected_cpu_kind(), "detected")
    expected = {"avx2": "fp32", "avx512_bf16": "bf16", "amx": "bf16"}.get(kind)
    if expected:
        assert hardware.resolve_precision("auto", "cpu") == expected
