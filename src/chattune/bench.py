"""`chattune bench`: the tutorial recipe vs chattune's defaults, same model, same samples, same steps, one run.

    chattune bench [model=bundled] [data=FILE] [samples=120] [steps=30] [batch_size=4] [max_length=512]
                   [lora.r=8] [recipes=tutorial,dynamic,chattune] [threads=N] [last=5] [eval_samples=40]
                   [rounds=1] [out=results.json]

Recipes (everything else is identical: config defaults, LoRA r on all linear layers, optimizer, schedule, seed):
- tutorial: every sample padded to `max_length`, fp32, logits over every position, no length grouping;
- dynamic:  padding to the longest sample of each batch, fp32, full logits (a middle baseline);
- chattune: chattune's defaults (padding-free packing, label-only logits, precision=auto);
- compiled: chattune's defaults plus train.compile=true (only when asked for: recipes=chattune,compiled);
- unfused:  chattune's defaults with lora.fuse=false (peft's own adapter calls, one dropout mask per adapter;
            only when asked for: recipes=chattune,unfused).
- top_half: chattune's defaults with adapters in the top half of the decoder layers only (lora.layers=N/2: no
            backward below them). Not the same training (half the adapters): read its held-out loss beside its
            speed. Only when asked for: recipes=chattune,top_half.

Fairness:
- every recipe trains on the first `samples` records, in one fixed shuffled order, `batch_size` per step, so step k
  of every recipe sees the same samples (the same real tokens) and their losses are comparable step by step;
- each recipe runs in a fresh subprocess (a freed PyTorch heap does not shrink the RSS, so a second recipe in the
  same process would be measured against the first one's leftovers); the machine's matmul peak is measured in the
  parent, once, with the same thread count;
- throughput = real (non-pad) tokens / seconds inside optimizer steps, first step excluded (one-time warm-up);
- memory: CPU: the peak RSS during training (the process' RSS high-water mark is reset when training starts,
  through /proc/self/clear_refs, and read at the end), and its growth over the RSS at the start of training
  (model and data already loaded). GPU: torch.cuda.max_memory_allocated, reset at the start of training.
- loss: the mean training loss of the last `last` steps, as each recipe computes it (bf16 rounds the logits), and
  a held-out loss: the next `eval_samples` records after the training ones, scored in fp32 by the same code for
  every recipe (fp32 base model + the recipe's saved adapter), so the two can be compared free of numerics;
- order: on a shared VM the recipe that runs second can be measurably faster whatever it is (seen on the project's
  AVX2 VM: docs/benchmarks.md), so `rounds=N` runs the recipe list N times, reversing the order every other round
  (ABBA...), and reports each recipe's mean over its rounds, with every round's figures and position in the JSON;
  the held-out loss (deterministic) is scored in the first round only;
- MFU-style share: model FLOPs per real token (4 per frozen parameter: forward 2 + input gradient 2; 6 per trainable
  parameter, which also gets a weight gradient; 2 per parameter of the layers below the lowest trained one, which
  the backward pass never reaches) x real tokens/s, divided by the matmul throughput measured here for
  the recipe's precision. Attention-score FLOPs are left out (a few % at these lengths). See docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import Field, field_validator

from chattune.config import apply_overrides, validate
from chattune.errors import ChattuneError, ConfigError
from chattune.methods.base import Section

WORKER_PREFIX = "[bench] "

RECIPES: dict[str, dict] = {
    "tutorial": {
        "about": "pad every sample to max_length, fp32, full logits (HF tutorial recipe)",
        "overrides": ["data.packing=false", "train.group_by_length=false", "train.precision=fp32",
                      "train.label_only_logits=false"],
        "pad_to_max_length": True,
        "baseline": True,
    },
    "dynamic": {
        "about": "pad to the batch's longest sample, fp32, full logits",
        "overrides": ["data.packing=false", "train.group_by_length=false", "train.precision=fp32",
                      "train.label_only_logits=false"],
        "pad_to_max_length": False,
        "baseline": True,
    },
    "chattune": {
        "about": "chattune defaults: packing, label-only logits, precision=auto",
        "overrides": [],
        "pad_to_max_length": False,
        "baseline": False,
    },
    "compiled": {  # not in the default recipes: opt in with recipes=chattune,compiled
        "about": "chattune defaults + train.compile=true (compile time counted in the whole-process figure)",
        "overrides": ["train.compile=true"],
        "pad_to_max_length": False,
        "baseline": False,
    },
    "top_half": {  # not in the default recipes: opt in with recipes=chattune,top_half
        "about": "chattune defaults with adapters in the top half of the decoder layers only (lora.layers: no "
                 "backward below them; fewer adapters, so compare the held-out loss too)",
        "overrides": [],
        "layer_share": 0.5,
        "pad_to_max_length": False,
        "baseline": False,
    },
    "unfused": {  # not in the default recipes: opt in with recipes=chattune,unfused
        "about": "chattune defaults with lora.fuse=false (peft's own adapter calls, one dropout mask each)",
        "overrides": ["lora.fuse=false"],
        "pad_to_max_length": False,
        "baseline": False,
    },
}


DEFAULT_DATA = Path("shared") / "data" / "llamafactory" / "alpaca_en_demo.json"


def default_data_path() -> Path | None:
    """The LLaMA-Factory demo set of a `shared/` data folder in or next to the current directory (as in the
    project's checkout layout); an installed chattune never looks inside its own source tree."""
    for candidate in (Path.cwd() / DEFAULT_DATA, Path.cwd().parent / DEFAULT_DATA):
        if candidate.is_file():
            return candidate
    return None


class BenchLora(Section):
    r: int = Field(8, ge=1)


class BenchSpec(Section):
    model: str = "bundled"
    data: str = ""
    samples: int = Field(120, ge=1)
    steps: int = Field(30, ge=1)
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(512, ge=8)
    lora: BenchLora = Field(default_factory=BenchLora)
    recipes: list[str] = Field(default_factory=lambda: ["tutorial", "chattune"])
    threads: int | None = Field(None, ge=1)
    last: int = Field(5, ge=1)
    seed: int = 42
    eval_samples: int = Field(40, ge=0)
    rounds: int = Field(1, ge=1, description="run the recipes this many times, alternating their order")
    out: str | None = None
    isolate: bool = True

    @field_validator("recipes", mode="before")
    @classmethod
    def _recipes(cls, v):
        names = [n.strip() for n in v.split(",")] if isinstance(v, str) else list(v)
        names = [n for n in names if n]
        unknown = [n for n in names if n not in RECIPES]
        if unknown or not names:
            raise ValueError(f"unknown recipe(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(RECIPES)}")
        return list(dict.fromkeys(names))


def parse_args(args: list[str]) -> BenchSpec:
    """`key=value` arguments, parsed and checked by the same machinery as run configs (did-you-mean included)."""
    spec = validate(BenchSpec, apply_overrides({}, args))
    data = Path(spec.data) if spec.data else default_data_path()
    if data is None or not data.is_file():
        raise ConfigError(f"bench: data file {data or DEFAULT_DATA} not found; give one with data=FILE (.json or "
                          f".jsonl in alpaca/messages/sharegpt format; the default is {DEFAULT_DATA} in or next to "
                          "the current directory)")
    spec.data = str(data.resolve())
    return spec


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


def sample_order(n_samples: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """steps x batch_size indices: shuffled epochs of range(n_samples), the same for every recipe."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(n_samples, generator=g).tolist())
    return order[: steps * batch_size]


def _subset_file(data: str, samples: int, workdir: Path, eval_samples: int = 0) -> tuple[Path, int, Path | None]:
    """The first `samples` records of `data` as a JSON array (the same file for every recipe), and the next
    `eval_samples` records as the held-out file (None when there are none)."""
    path = Path(data)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
        if not isinstance(records, list):
            raise ConfigError(f"bench: {path} must hold a JSON array of records")
    heldout = records[samples:samples + eval_samples]
    records = records[:samples]
    out = workdir / "bench-data.json"
    out.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    eval_file = None
    if heldout:
        eval_file = workdir / "bench-heldout.json"
        eval_file.write_text(json.dumps(heldout, ensure_ascii=False), encoding="utf-8")
    return out, len(records), eval_file


def recipe_config(spec: BenchSpec, recipe: str, data_file: Path, output_dir: Path):
    from chattune.config import load_config

    overrides = [f"model={spec.model}", f"data.train={data_file}", f"data.max_length={spec.max_length}",
                 f"lora.r={spec.lora.r}", "lora.target=all", f"train.batch_size={spec.batch_size}",
                 f"train.max_steps={spec.steps}", "train.logging_steps=1", f"train.save_steps={10**9}",
                 f"train.seed={spec.seed}", f"output_dir={output_dir}", "overwrite=true"]
    if spec.threads:
        overrides.append(f"train.num_threads={spec.threads}")
    extra = list(RECIPES[recipe]["overrides"])
    if "layer_share" in RECIPES[recipe]:
        from chattune.methods.freeze import _configured_layers

        n_layers = _configured_layers(spec.model)
        if n_layers is None:
            raise ChattuneError(f"bench: recipe `{recipe}` needs the model's layer count, which {spec.model}'s "
                                "config.json does not give; leave the recipe out")
        extra.append(f"lora.layers={max(1, round(n_layers * RECIPES[recipe]['layer_share']))}")
    return load_config(None, overrides + extra)


def heldout_loss(cfg, adapter_dir: Path, eval_file: Path) -> tuple[float, int]:
    """Trained-token mean loss of the adapter on `eval_file`, in fp32 on the fp32 base model, padded batches, no
    dropout: the same scoring for every recipe. Returns (loss, trained tokens)."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    from chattune.data.collate import PaddingCollator
    from chattune.data.encode import IGNORE
    from chattune.train.trainer import load_for_training, prepare_data

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
    from chattune.train.trainer import TrainOptions, train

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


# ---------------------------------------------------------------- orchestration


def _run_isolated(spec: BenchSpec, recipe: str, data_file: Path, n_samples: int, workdir: Path, log,
                  eval_file: Path | None = None) -> dict:
    job = workdir / f"job-{recipe}.json"
    result_path = workdir / f"result-{recipe}.json"
    job.write_text(json.dumps({"spec": spec.model_dump(), "recipe": recipe, "data_file": str(data_file),
                               "n_samples": n_samples, "workdir": str(workdir), "result": str(result_path),
                               "eval_file": str(eval_file) if eval_file else None,
                               "spawned_at": time.time()}))  # start-up and whole-process times count from here
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "chattune.bench", "--worker", str(job)]
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            # the training progress bar redraws with "\r" and no newline, so a report can follow it on one line
            for part in line.rstrip("\n").split("\r"):
                if part.startswith(WORKER_PREFIX):
                    log(f"  {recipe}: {part[len(WORKER_PREFIX):]}")
                elif part.strip():
                    tail = (tail + [part])[-40:]
        rc = proc.wait()
    if rc != 0 or not result_path.exists():
        error = json.loads(result_path.read_text()).get("error") if result_path.exists() else None
        raise ConfigError(f"bench: recipe `{recipe}` failed (exit {rc})"
                          + (f": {error}" if error else "") + "\n" + "\n".join(tail[-20:]))
    return json.loads(result_path.read_text())


def _worker(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    spec = BenchSpec.model_validate(job["spec"])
    from chattune.log import quiet_libraries

    quiet_libraries()
    try:
        eval_file = Path(job["eval_file"]) if job.get("eval_file") else None
        result = run_recipe(spec, job["recipe"], Path(job["data_file"]), job["n_samples"], Path(job["workdir"]),
                            eval_file, job.get("spawned_at"))
    except ChattuneError as e:
        Path(job["result"]).write_text(json.dumps({"error": str(e)}))
        print(str(e), file=sys.stderr)
        return 2
    Path(job["result"]).write_text(json.dumps(result))
    return 0


TIMED = ("tokens_per_s", "s_per_step", "total_seconds", "startup_seconds", "process_seconds", "peak_memory_mb",
         "peak_memory_growth_mb", "achieved_gflops")


def combine_rounds(runs: list[dict]) -> dict:
    """One recipe's result over its rounds: the first round's record (its losses, held-out score and settings)
    with every timed figure replaced by the mean over the rounds, and each round's figures under `rounds`."""
    combined = {k: v for k, v in runs[0].items() if k not in ("round", "position")}
    if len(runs) == 1:
        return combined
    for key in TIMED:
        values = [r[key] for r in runs if r.get(key) is not None]
        combined[key] = round(sum(values) / len(values), 3) if len(values) == len(runs) else combined.get(key)
    combined["rounds"] = [{k: r.get(k) for k in ("round", "position", *TIMED, "final_loss")} for r in runs]
    return combined


def add_ratios(results: dict[str, dict], machine: dict) -> dict:
    peaks = machine.get("matmul_gflops", {})
    for r in results.values():
        peak = peaks.get(r["precision"]) or peaks.get("fp32")
        r["matmul_peak_gflops"] = peak
        r["mfu_percent"] = round(100 * r["achieved_gflops"] / peak, 2) if peak else None
    ratios = {}
    if "tutorial" in results:
        base = results["tutorial"]
        for name, r in results.items():
            if name == "tutorial":
                continue
            ratios[f"{name}_vs_tutorial"] = {
                "tokens_per_s": round(r["tokens_per_s"] / base["tokens_per_s"], 2) if base["tokens_per_s"] else None,
                "peak_memory": round(r["peak_memory_mb"] / base["peak_memory_mb"], 3) if base["peak_memory_mb"] else None,
                "final_loss_diff": (round(r["final_loss"] - base["final_loss"], 4)
                                    if r["final_loss"] is not None and base["final_loss"] is not None else None),
                "process_seconds": (round(base["process_seconds"] / r["process_seconds"], 2)
                                    if r.get("process_seconds") and base.get("process_seconds") else None),
                "heldout_loss_diff": (round(r["heldout_loss"] - base["heldout_loss"], 4)
                                      if r.get("heldout_loss") is not None and base.get("heldout_loss") is not None
                                      else None),
            }
    if "dynamic" in results and "chattune" in results and results["dynamic"]["tokens_per_s"]:
        ratios["chattune_vs_dynamic"] = {
            "tokens_per_s": round(results["chattune"]["tokens_per_s"] / results["dynamic"]["tokens_per_s"], 2)}
    return ratios


def format_table(results: dict[str, dict], ratios: dict, machine: dict) -> str:
    head = ["recipe", "precision", "batching", "logits", "real tok/s", "s/step", "start-up s", "process s",
            "peak MB", "growth MB", "final loss", "held-out loss", "GFLOP/s", "MFU %"]
    rows = [head]
    for r in results.values():
        growth = r["peak_memory_growth_mb"]
        rows.append([r["recipe"], r["precision"], r["batching"], r["logits"], f"{r['tokens_per_s']:.1f}",
                     f"{r['s_per_step']:.2f}",
                     f"{r['startup_seconds']:.1f}" if r.get("startup_seconds") is not None else "-",
                     f"{r['process_seconds']:.1f}" if r.get("process_seconds") is not None else "-",
                     f"{r['peak_memory_mb']:.0f}",
                     f"{growth:.0f}" if growth is not None else "-",
                     f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-",
                     f"{r['heldout_loss']:.4f}" if r.get("heldout_loss") is not None else "-",
                     f"{r['achieved_gflops']:.1f}", f"{r['mfu_percent']:.1f}" if r["mfu_percent"] is not None else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in machine.get("matmul_gflops", {}).items())
    where = machine.get("cpu") or machine.get("gpu") or machine["device"]
    extra = f", capability {machine['cpu_capability']}, {machine['threads']} threads" if "cpu" in machine else ""
    lines.append(f"machine: {where}{extra}; measured matmul GFLOP/s: {peaks}")
    for name, r in results.items():
        if r.get("rounds"):
            each = ", ".join(f"{x['tokens_per_s']:.1f} (run {x['position']} of its round)" for x in r["rounds"])
            lines.append(f"rounds of {name} (mean shown above): real tok/s {each}")
    for name, ratio in ratios.items():
        parts = [f"{ratio['tokens_per_s']}x real tokens/s"]
        if ratio.get("process_seconds"):
            parts.append(f"{ratio['process_seconds']}x whole process")
        if "peak_memory" in ratio:
            parts.append(f"{ratio['peak_memory']}x peak memory")
        if ratio.get("final_loss_diff") is not None:
            parts.append(f"final loss {ratio['final_loss_diff']:+.4f}")
        if ratio.get("heldout_loss_diff") is not None:
            parts.append(f"held-out loss {ratio['heldout_loss_diff']:+.4f}")
        lines.append(f"speedup {name.replace('_vs_', ' vs ')}: " + ", ".join(parts))
    return "\n".join(lines)


def main(args: list[str], log=print) -> int:
    spec = parse_args(args)
    machine = machine_info(spec.threads)
    log(f"bench: {spec.samples} samples from {spec.data}, {spec.steps} steps of batch {spec.batch_size}, "
        f"max_length {spec.max_length}, LoRA r={spec.lora.r} on all linear layers; recipes: {', '.join(spec.recipes)}")
    log(f"bench: matmul GFLOP/s on this machine: {machine['matmul_gflops']}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="chattune-bench-") as tmp:
        workdir = Path(tmp)
        data_file, n_samples, eval_file = _subset_file(spec.data, spec.samples, workdir, spec.eval_samples)
        if n_samples < spec.batch_size:
            raise ConfigError(f"bench: {spec.data} holds only {n_samples} records, fewer than batch_size")
        runs: dict[str, list[dict]] = {recipe: [] for recipe in spec.recipes}
        for round_index in range(spec.rounds):
            order = spec.recipes if round_index % 2 == 0 else spec.recipes[::-1]
            scored = eval_file if round_index == 0 else None
            for position, recipe in enumerate(order):
                where = f", round {round_index + 1} of {spec.rounds}" if spec.rounds > 1 else ""
                log(f"bench: recipe `{recipe}` ({RECIPES[recipe]['about']}{where})")
                if spec.isolate:
                    run = _run_isolated(spec, recipe, data_file, n_samples, workdir, log, scored)
                else:
                    run = run_recipe(spec, recipe, data_file, n_samples, workdir, scored)
                runs[recipe].append(run | {"round": round_index + 1, "position": position + 1})
        results = {recipe: combine_rounds(recipe_runs) for recipe, recipe_runs in runs.items()}
    ratios = add_ratios(results, machine)
    table = format_table(results, ratios, machine)
    print(table, flush=True)
    report = {"settings": {k: v for k, v in spec.model_dump().items() if k not in ("out", "isolate")} | {"samples_used": n_samples},
              "machine": machine, "recipes": results, "ratios": ratios,
              "method": {"throughput": "real (non-pad) tokens / seconds inside optimizer steps, first step excluded",
                         "memory": ("peak RSS during training (high-water mark reset at train start), fresh process "
                                    "per recipe" if spec.isolate else "peak RSS during training, same process")
                         if machine["device"] == "cpu" else "torch.cuda.max_memory_allocated during training",
                         "final_loss": f"trained-token-weighted mean loss of the last {spec.last} steps",
                         "heldout_loss": (f"records {spec.samples}..{spec.samples + spec.eval_samples - 1} of the data, "
                                          "scored in fp32 on the fp32 base with the recipe's adapter"),
                         "mfu": "(4 x frozen params + 6 x trainable params) x real tokens/s / measured matmul FLOP/s",
                         "startup": "launch of the recipe's process -> its first optimizer step begins",
                         "process": "launch of the recipe's process -> training done and saved (held-out scoring "
                                    "not counted); the whole-process speedup is tutorial's time / the recipe's"}}
    if spec.out:
        out = Path(spec.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        log(f"bench: results written to {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
