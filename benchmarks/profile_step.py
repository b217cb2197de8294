"""Where a LoRA training step spends its time: torch.profiler over a few optimizer steps of `chattune train`,
each operator's own (self) CPU time grouped by kind of work, next to the steps' wall time.

    python benchmarks/profile_step.py                       # bundled model, bench's alpaca demo setting
    python benchmarks/profile_step.py train.compile=true    # any run-config key=value, e.g. the compiled layers
    python benchmarks/profile_step.py --steps 4 --skip 2 --json out.json

The run is the setting of docs/benchmarks.md (LoRA r=8 alpha=32 dropout 0.1 on all linear layers, batch 4,
max_length 512, ChatML system prompt "You are a helpful assistant.", the first 120 records of
alpaca_en_demo.json). The first `--skip` steps are not profiled (warm-up, compilation). "Python and the rest" is
the wall time of the profiled steps minus every operator's self time: per-step Python, the Trainer's loop, the
data collator and anything else that runs outside torch operators. The operator calls per step are exact counts,
which, unlike the seconds, do not drift with the machine's speed between two runs.

Kinds, by operator name (and, for matrix products, by shape: a product with a side of at most 64 is an adapter's
rank-r product):
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

KINDS = [
    ("matmuls (base weights)", ()),
    ("matmuls (rank-r adapters)", ()),
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention", "sdpa")),
    ("loss", ("log_softmax", "logsumexp", "nll_loss", "cross_entropy", "_softmax_backward", "exp", "gather",
              "scatter")),
    ("norms and activations", ("silu", "rsqrt", "pow", "mean", "sigmoid", "tanh", "gelu")),
    ("optimizer", ("_fused_adam", "_foreach", "lerp", "addcdiv", "vector_norm", "_amp")),
    ("rotary, dropout and other elementwise", ("mul", "add", "neg", "sub", "div", "where", "masked_fill",
                                               "bernoulli", "dropout", "sum")),
    ("copies and layout", ("copy_", "cat", "clone", "contiguous", "to", "fill_", "zero_", "index", "slice",
                           "embedding", "empty", "resize", "view", "transpose", "permute", "t", "expand",
                           "select", "reshape", "unsqueeze", "split", "narrow", "as_strided", "stack")),
]
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int8pack_mm")
__doc__ += "\n".join(f"- {name}: {', '.join(keys) if keys else 'aten::mm/addmm/bmm'}" for name, keys in KINDS)


def kind_of(name: str, shapes) -> str:
    if name in MATMULS:
        dims = [d for s in (shapes or []) if s for d in s]
        return "matmuls (rank-r adapters)" if dims and min(dims) <= 64 else "matmuls (base weights)"
    if not name.startswith("aten::"):  # profiler ranges (e.g. "Torch-Compiled Region"), optimizer.step#..., ...
        return "optimizer" if name.lower().startswith("optimizer") else "other operators"
    short = name.split("::")[-1].lower().lstrip("_")
    for kind, keys in KINDS[2:]:
        if any(short == k.lstrip("_") or short.startswith(k.lstrip("_") + "_") or (len(k) > 3 and k in short)
               for k in keys):
            return kind
    return "other operators"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="run-config key=value")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps profiled")
    p.add_argument("--skip", type=int, default=2, help="steps run before profiling")
    p.add_argument("--data", default=None, help="default: bench's alpaca_en_demo.json")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    a = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from chattune.bench import default_data_path
    from chattune.config import load_config
    from chattune.train.options import TrainOptions
    from chattune.train.trainer import train

    data = Path(a.data) if a.data else default_data_path()
    if data is None or not data.exists():
        print("no data: give --data FILE (the default is ../shared/data/llamafactory/alpaca_en_demo.json)")
        return 2
    records = json.loads(data.read_text())[:120] if data.suffix == ".json" else None
    work = Path(tempfile.mkdtemp(prefix="chattune-profile-"))
    if records is not None:
        data = work / "data.json"
        data.write_text(json.dumps(records, ensure_ascii=False))

    class Profile(TrainerCallback):
        def __init__(self):
            self.prof, self.t0, self.wall = None, 0.0, 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == a.skip:
                self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == a.skip + a.steps:
                self.wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                control.should_training_stop = True

    cb = Profile()
    cfg = load_config("lora", [f"data.train={data}", f"output_dir={work / 'run'}", "lora.r=8", "lora.alpha=32",
                               "lora.dropout=0.1", "train.batch_size=4", "data.max_length=512", "train.lr=1e-4",
                               "template=chatml", "data.system=You are a helpful assistant.",
                               f"train.max_steps={a.skip + a.steps}", "train.save_steps=100000", *a.overrides])
    train(cfg, log=lambda m: None, options=TrainOptions(callbacks=(cb,)))
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for ev in cb.prof.key_averages(group_by_input_shape=True):
        kind = kind_of(ev.key, ev.input_shapes)
        totals[kind] += ev.self_cpu_time_total / 1e6
        calls[kind] += ev.count
    ops = sum(totals.values())
    totals["Python and the rest"] = max(cb.wall - ops, 0.0)
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    print(f"{a.steps} profiled steps, {cb.wall:.2f} s wall ({cb.wall / a.steps:.2f} s/step), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; overrides: {' '.join(a.overrides) or 'none'}")
    print("| kind of work | s/step | share | operator calls/step |\n|---|---|---|---|")
    for kind, sec in rows:
        n = f"{calls[kind] / a.steps:,.0f}" if kind in calls else "-"
        print(f"| {kind} | {sec / a.steps:.3f} | {100 * sec / cb.wall:.1f}% | {n} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"wall_s_per_step": cb.wall / a.steps, "overrides": a.overrides,
                                            "kinds": {k: s / a.steps for k, s in rows},
                                            "calls_per_step": {k: calls[k] / a.steps for k in calls}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
