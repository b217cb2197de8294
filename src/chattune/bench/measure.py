"""How `chattune bench` measures one recipe (in its worker process): the step times and memory while it trains,
real tokens/s, the losses, FLOPs per token, and the machine's own matmul throughput for the MFU-style share.

- throughput = real (non-pad) tokens / seconds inside optimizer steps, first step excluded (one-time warm-up);
- memory: CPU: the peak RSS during training (the process' RSS high-water mark is reset when training starts,
  through /proc/self/clear_refs, and read at the end), and its growth over the RSS at the start of training
  (model and data already loaded). GPU: torch.cuda.max_memory_allocated, reset at the start of training.
- loss: the mean training loss of the last `last` steps, as each recipe computes it (bf16 rounds the logits), and
  a held-out loss: the next `eval_samples` records after the training ones, scored in fp32 by the same code for
  every recipe (fp32 base model + the recipe's saved adapter), so the two can be compared free of numerics;
- MFU-style share: model FLOPs per real token (4 per frozen parameter: forward 2 + input gradient 2; 6 per trainable
  parameter, which also gets a weight gradient; 2 per parameter of the layers below the lowest trained one, which
  the backward pass never reaches) x real tokens/s, divided by the matmul throughput measured here for
  the recipe's precision. Attention-score FLOPs are left out (a few % at these lengths). See docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from chattune.bench.recipes import RECIPES, BenchSpec, recipe_config, sample_order

WORKER_PREFIX = "[bench] "


def matmul_gflops(dtype_name: str, n: int = 1024, seconds: float = 0.5) -> float:
    """Measured dense matmul throughput (n x n x n) in GFLOP/s, with the current torch thread count."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b  # warm-up: kernel selection, page faults
    sync()
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        if count % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2 * n**3 * count / elapsed / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None) -> dict:
    import torch

    from chattune.hardware import cpu_kind, device_type, set_cpu_threads

    device = device_type()
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    if device == "cpu":
        info.update(cpu=cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                    cpu_kind="{} ({})".format(*cpu_kind()), threads=set_cpu_threads(threads))
    else:
        info.update(gpu=torch.cuda.get_device_name(0))
    info["matmul_gflops"] = {p: round(matmul_gflops(p), 1) for p in (("fp32", "bf16") if device == "cpu"
                                                                      else ("fp32", "bf16", "fp16"))}
    return info


# ---------------------------------------------------------------- one recipe (runs in the worker)


def _make_step_recorder():
    from chattune.hardware import peak_memory_mb, proc_status_kb, reset_peak_memory

    import torch
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        """Wall time of every optimizer step, and memory from the start of training."""

        def __init__(self):
            self.seconds: list[float] = []
            self.rss_start_mb = None
            self.hwm_reset = False
            self._t0 = 0.0
            self.cuda = torch.cuda.is_available()

        def on_train_begin(self, args, state, control, **kw):
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.rss_start_mb = torch.cuda.memory_allocated() / 2**20
            else:
                rss = proc_status_kb("VmRSS")
                self.rss_start_mb = rss / 1024 if rss is not None else None
                self.hwm_reset = reset_peak_memory("cpu")

        first_step_at = None  # time.time() when the first optimizer step began (for start-up time)

        def on_step_begin(self, args, state, control, **kw):
            if self.cuda:
                torch.cuda.synchronize()
            if self.first_step_at is None:
                self.first_step_at = time.time()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and self.seconds:
                print(f"{WORKER_PREFIX}step {state.global_step}/{state.max_steps}: {self.seconds[-1]:.2f} s, "
                      f"loss {logs['loss']:.4f}", flush=True)

        def on_train_end(self, args, state, control, **kw):
            self.peak = self._read_peak()  # before saving and the held-out evaluation

        peak = None

        def peak_mb(self) -> float:
            return self.peak if self.peak is not None else self._read_peak()

        def _read_peak(self) -> float:
            if self.cuda:
                return torch.cuda.max_memory_allocated() / 2**20
            return peak_memory_mb("cpu")  # since the reset at train start (else the whole process' peak)

    return StepRecorder()


def heldout_loss(cfg, adapter_dir: Path, eval_file: Path) -> tuple[float, int]:
    """Trained-token mean loss of the adapter on `eval_file`, in fp32 on the fp32 base model, padded batches, no
    dropout: the same scoring for every recipe. Returns (loss, trained tokens)."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    from chattune.data.collate import PaddingCollator
    from chattune.data.encode import IGNORE
    from chattune.train.dataset import prepare_data
    from chattune.train.setup import load_for_training

    eval_cfg = cfg.model_copy(deep=True)
    eval_cfg.data.train = str(eval_file)
    model, tokenizer, template, _path = load_for_training(eval_cfg, "fp32", log=lambda *a: None)
    rows = prepare_data(eval_cfg, tokenizer, template).train.rows
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    collate = PaddingCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), cfg.train.batch_size):
            batch = collate(rows[i:i + cfg.train.batch_size])
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            keep = labels != IGNORE
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / max(count, 1), count


def run_recipe(spec: BenchSpec, recipe: str, data_file: Path, n_samples: int, workdir: Path,
               eval_file: Path | None = None, spawned_at: float | None = None) -> dict:
    """Train one recipe in this process; return its measurements. `spawned_at` (time.time() when the parent
    started this process) gives the whole-process figures: start-up = launch -> the first optimizer step begins,
    whole process = launch -> training done and its output saved (what `chattune train` costs a user; the
    held-out scoring that follows is bench's own and is not counted)."""
    from chattune.train.options import TrainOptions
    from chattune.train.trainer import train

    cfg = recipe_config(spec, recipe, data_file, workdir / f"run-{recipe}")
    recorder = _make_step_recorder()
    order = sample_order(n_samples, spec.steps, spec.batch_size, spec.seed)
    pad_to = spec.max_length if RECIPES[recipe]["pad_to_max_length"] else None
    def log(msg: str) -> None:
        print(WORKER_PREFIX + msg, flush=True)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = train(cfg, log=log, options=TrainOptions(sample_order=order, pad_to=pad_to, callbacks=(recorder,),
                                                      baseline=RECIPES[recipe]["baseline"]))
    trained_at = time.time()
    metrics = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m.get("loss") is not None]
    run = json.loads((Path(result.output_dir) / "run.json").read_text())
    summary = summarize(recipe, spec, steps, recorder.seconds, recorder.peak_mb(), recorder.rss_start_mb,
                        result.trainable_params, result.total_params, run.get("precision", "fp32"),
                        bool(run.get("packing")), cfg.train.label_only_logits, pad_to, load_before,
                        forward_only=forward_only_params(result.run.model))
    summary["startup_seconds"] = summary["process_seconds"] = None
    if spawned_at is not None:
        summary["process_seconds"] = round(trained_at - spawned_at, 2)
        if recorder.first_step_at is not None:
            summary["startup_seconds"] = round(recorder.first_step_at - spawned_at, 2)
    summary["heldout_loss"] = summary["heldout_tokens"] = None
    if eval_file is not None:
        loss, tokens = heldout_loss(cfg, Path(result.output_dir), eval_file)
        summary["heldout_loss"], summary["heldout_tokens"] = round(loss, 4), tokens
        log(f"held-out loss (fp32, {tokens} trained tokens): {loss:.4f}")
    return summary


def forward_only_params(model) -> int:
    """Parameters of the decoder layers below the lowest one that trains (lora.layers, Freeze): the backward pass
    never reaches them, so they cost 2 FLOPs per token (forward), not 4. 0 when every layer is reached (also when
    no layer holds a trainable parameter, e.g. a prefix, whose gradients flow through all of them)."""
    from chattune.errors import MethodError
    from chattune.methods.freeze import decoder_layers, lowest_trained_layer

    try:
        _, layers = decoder_layers(model)
    except MethodError:
        return 0
    first = lowest_trained_layer(layers)
    return sum(p.numel() for layer in layers[:first or 0] for p in layer.parameters())


def summarize(recipe: str, spec: BenchSpec, steps: list[dict], seconds: list[float], peak_mb: float,
              start_mb: float | None, trainable: int, total: int, precision: str, packing: bool,
              label_only: bool, pad_to: int | None, load_before: float | None = None, forward_only: int = 0) -> dict:
    n = min(len(steps), len(seconds))
    steps, seconds = steps[:n], seconds[:n]
    timed = slice(1, n) if n > 1 else slice(0, n)  # the first step is warm-up
    timed_tokens = sum(s["tokens"] for s in steps[timed])
    timed_seconds = sum(seconds[timed])
    tail = steps[-min(spec.last, n):] if n else []
    tail_trained = sum(s["trained_tokens"] for s in tail)
    final_loss = (sum(s["loss"] * s["trained_tokens"] for s in tail) / tail_trained) if tail_trained else None
    flops_per_token = 4 * (total - trainable) + 6 * trainable - 2 * forward_only
    tokens_per_s = timed_tokens / timed_seconds if timed_seconds else 0.0
    return {
        "recipe": recipe,
        "about": RECIPES[recipe]["about"],
        "precision": precision,
        "batching": "packed" if packing else (f"pad to {pad_to}" if pad_to else "pad to batch max"),
        "logits": "label-only" if label_only else "full",
        "steps": n,
        "real_tokens": sum(s["tokens"] for s in steps),
        "trained_tokens": sum(s["trained_tokens"] for s in steps),
        "tokens_per_s": round(tokens_per_s, 2),
        "s_per_step": round(timed_seconds / max(len(seconds[timed]), 1), 3),
        "total_seconds": round(sum(seconds), 2),
        "peak_memory_mb": round(peak_mb, 1),
        "memory_at_train_start_mb": round(start_mb, 1) if start_mb is not None else None,
        "peak_memory_growth_mb": round(peak_mb - start_mb, 1) if start_mb is not None else None,
        "final_loss": round(final_loss, 4) if final_loss is not None else None,
        "final_loss_steps": len(tail),
        "losses": [round(s["loss"], 4) for s in steps],
        "step_seconds": [round(s, 3) for s in seconds],
        "trainable_params": trainable,
        "total_params": total,
        "flops_per_token": flops_per_token,
        "forward_only_params": forward_only,
        "achieved_gflops": round(tokens_per_s * flops_per_token / 1e9, 2),
        "loadavg_before": round(load_before, 2) if load_before is not None else None,
        "loadavg_after": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
