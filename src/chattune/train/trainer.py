"""The training recipe, in named phases: prepare (model, data, packing, method) -> training arguments -> trainer
and callbacks -> fit -> finalize (final save, run.json). `train()` at the bottom runs them in order.

What chattune adds to Trainer (and why it is written here rather than taken from a library):
- label-only logits: the output head runs only where a label is set (`logits_to_keep` as a boolean mask),
  because over a 49k-150k vocabulary the head costs as much as several layers and prompt tokens carry no loss;
- a loss normalised by the number of trained tokens in the whole optimizer step (exact under gradient
  accumulation), with per-step accounting of loss and real tokens for metrics.jsonl;
- checkpoints marked complete atomically, so `resume=auto` never picks a half-written one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from chattune import __version__, outputs
from chattune.config import RunConfig
from chattune.data.collate import make_collator
from chattune.data.encode import IGNORE, EncodeStats, encode_conversations, truncation_report
from chattune.data.formats import load_conversations
from chattune.data.templates import Template, get_template
from chattune.errors import ChattuneError, ConfigError, DataError
from chattune.evaluate.metrics import LOWER_IS_BETTER, metric_columns
from chattune.hardware import choose_precision, device_type, keep_freed_memory, peak_memory_mb, reset_peak_memory, \
    set_cpu_threads, torch_dtype
from chattune.methods import count_parameters, get_method
from chattune.methods.base import Method
from chattune.methods.common import resolve_deepspeed_config, resolve_shipped_json
from chattune.models.families import packing_off_reason
from chattune.models.load import generation_stop_ids, load_model, load_tokenizer, model_type, resolve_model_path
from chattune.train import fast_dropout, packed_attention
from chattune.train.compile import check_compile, compile_layers, should_compile
from chattune.train.callbacks import InterruptCallback, MetricsCallback, NanGuardCallback, QuietProgressCallback, \
    StopAfterCallback
from chattune.train.chunked_loss import cross_entropy_sum


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class PreparedData:
    train: ListDataset
    eval: ListDataset | None
    stats: EncodeStats
    skipped: list[str] = field(default_factory=list)


def encode_file(path: str, cfg: RunConfig, tokenizer, template, split: str, stats: EncodeStats, skipped: list[str],
                log=print):
    d = cfg.data
    loaded = load_conversations(path, split=split, fmt=d.format, skip_invalid=d.skip_invalid,
                                train_on=d.train_on, default_system=d.system)
    skipped.extend(loaded.problems)
    for line in loaded.skip_report():
        log(line)
    encoded = encode_conversations(loaded.conversations, template, tokenizer, d.max_length, d.truncation, stats)
    return [{"input_ids": e.input_ids, "labels": e.labels, "source": e.source} for e in encoded]


def _backward_reach(model) -> str:
    """For the log: where the backward pass starts when the lowest decoder layers train nothing (lora.layers,
    freeze.trainable_layers), else nothing."""
    from chattune.errors import MethodError
    from chattune.methods.freeze import decoder_layers, lowest_trained_layer

    try:
        _, layers = decoder_layers(model)
    except MethodError:
        return ""
    first = lowest_trained_layer(layers)
    if not first:  # None (no layer trains) or 0 (every layer is reached)
        return ""
    below = "layer 0 runs" if first == 1 else f"layers 0-{first - 1} run"
    return f"; backward stops at decoder layer {first} ({below} forward only)"


def prepare_data(cfg: RunConfig, tokenizer, template, log=print) -> PreparedData:
    """Read, validate and encode the training (and eval) data; over-long samples are reported loudly when more
    than 5% lose something (with the data.max_length that would keep 95% whole)."""
    if not cfg.data.train:
        raise ConfigError("no training data: set data.train=FILE (.json/.jsonl, or a folder with a train split)")
    stats, skipped = EncodeStats(), []
    train_rows = encode_file(cfg.data.train, cfg, tokenizer, template, "train", stats, skipped, log)
    for line in truncation_report(stats, cfg.data.max_length, cfg.data.truncation):
        log(line)
    if not train_rows:
        raise DataError([f"{cfg.data.train}: every sample was dropped by data.truncation={cfg.data.truncation}"],
                        "fix: raise data.max_length")
    eval_rows = None
    if cfg.data.eval:
        eval_rows = encode_file(cfg.data.eval, cfg, tokenizer, template, "eval", EncodeStats(), skipped, log)
    return PreparedData(ListDataset(train_rows), ListDataset(eval_rows) if eval_rows else None, stats, skipped)


def _accepts(model, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def packing_is_exact(model) -> bool:
    """Does this model keep packed samples apart (restarted position_ids, no attention mask)? Checked, not
    assumed: remote-code models often ignore position_ids, and packing them would leak across samples."""
    if not _accepts(model, "position_ids"):
        return False
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (1, 5), generator=g)
    b = torch.randint(0, vocab, (1, 7), generator=g)
    device = model.get_input_embeddings().weight.device
    packed = torch.cat([a, b], 1).to(device)
    pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=b.to(device), use_cache=False).logits.float()
            together = model(input_ids=packed, position_ids=pos, use_cache=False).logits.float()[:, 5:]
    except Exception:  # noqa: BLE001 - any failure means: don't pack this model
        return False
    finally:
        model.train(was_training)
    scale = alone.abs().max().clamp(min=1.0)
    # Rounding differs between a 12- and a 7-token run: ~1e-6 in fp32, ~1e-2 in bf16 (bundled model); a leak across
    # samples changes the logits by ~0.6 of their scale.
    tolerance = 1e-2 if model.get_input_embeddings().weight.dtype == torch.float32 else 1e-1
    return bool(((alone - together).abs().max() / scale) < tolerance)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler draws each epoch's order from the global RNG, whose state at an epoch
    start differs between an uninterrupted run and a resumed one, so `resume=` would train on other batches.
    Here the order depends on (seed, epoch) only; accelerate calls `set_epoch` at every epoch start."""

    def __init__(self, base: LengthGroupedSampler, seed: int):
        self.__dict__.update(base.__dict__)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class FixedOrderSampler(torch.utils.data.Sampler):
    """Yields the given dataset indices in the given order (`chattune bench`: every recipe sees the same samples in
    the same steps, so their losses and real-token counts are comparable step by step)."""

    def __init__(self, order: list[int]):
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class StepAccounting:
    """Loss and token counts of the training steps, kept by the trainer and read by the metrics and NaN callbacks.

    - the window: loss sum, trained and real (non-pad) tokens since the metrics callback last took them;
    - the step: the same for the current optimizer step only, keyed by the Trainer's `global_step` (every
      micro-batch of one optimizer step sees the same value), so it stays right when an epoch's last step has
      fewer micro-batches than `train.grad_accum`;
    - totals over the whole run in this process, and the last window loss that was logged.
    """

    def __init__(self) -> None:
        self.window_loss_sum, self.window_trained, self.window_tokens = 0.0, 0, 0
        self.step_key: int | None = None
        self.step_loss_sum, self.step_trained = 0.0, 0
        self.step_bad_sources: list[str] = []  # records of this step's batches whose loss was not finite
        self.step_nonfinite = False  # a batch of this step had a non-finite loss that was kept (train.on_nan=stop)
        self.total_tokens = self.total_trained = 0
        self.last_logged_loss: float | None = None
        self.skipped_batches: list[tuple[int, list[str]]] = []  # (step, records) dropped by train.on_nan=skip

    def _enter_step(self, global_step: int) -> None:
        if global_step != self.step_key:
            self.step_key, self.step_loss_sum, self.step_trained, self.step_bad_sources = global_step, 0.0, 0, []
            self.step_nonfinite = False

    def add_nonfinite(self, global_step: int, sources: list[str], skipped: bool) -> None:
        """A micro-batch whose loss was NaN/inf; with `skipped` it contributed nothing to the step."""
        self._enter_step(global_step)
        self.step_bad_sources.extend(sources)
        if skipped:
            self.skipped_batches.append((global_step + 1, list(sources)))
        else:
            self.step_nonfinite = True

    def add(self, global_step: int, loss_sum: float, trained: int, real_tokens: int) -> None:
        self._enter_step(global_step)
        self.step_loss_sum += loss_sum
        self.step_trained += trained
        self.window_loss_sum += loss_sum
        self.window_trained += trained
        self.window_tokens += real_tokens
        self.total_tokens += real_tokens
        self.total_trained += trained

    @property
    def step_loss(self) -> float | None:
        """Mean loss per trained token of the optimizer step that ran last (None before the first; NaN when one of
        its batches had a non-finite loss that was not skipped)."""
        if self.step_nonfinite:
            return math.nan
        return self.step_loss_sum / self.step_trained if self.step_trained else None

    def take_window(self, across_ranks: bool = False) -> tuple[float | None, int, int]:
        """(mean loss, real tokens, trained tokens) since the last call, and start a new window. With
        `across_ranks` in a multi-process run, the sums of every rank (a collective: every rank must call it)."""
        loss_sum, trained, tokens = self.window_loss_sum, self.window_trained, self.window_tokens
        if across_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.tensor([loss_sum, trained, tokens], dtype=torch.float64)
            torch.distributed.all_reduce(both)
            loss_sum, trained, tokens = float(both[0]), int(both[1]), int(both[2])
            self.total_tokens += tokens - self.window_tokens  # totals count every rank's tokens too
        loss = loss_sum / trained if trained else None
        taken = (loss, tokens, trained)
        self.window_loss_sum, self.window_trained, self.window_tokens = 0.0, 0, 0
        if loss is not None:
            self.last_logged_loss = loss
        return taken


class ChattuneTrainer(Trainer):
    def __init__(self, *args, label_only_logits: bool = True, sample_order: list[int] | None = None,
                 chunked_loss: bool = True, warmup_ratio: float = 0.0, on_nan: str = "stop",
                 save_total_limit: int | None = None, generation_eval=None, **kwargs):
        self.sample_order = sample_order
        self.generation_eval = generation_eval  # (tokenizer, template, samples, metrics, max_new_tokens) or None
        self.on_nan = on_nan
        self.keep_checkpoints = save_total_limit  # rotation is ours: see _save_checkpoint
        self.chunked_loss = chunked_loss  # False: plain F.cross_entropy (the stock recipe, for `chattune bench`)
        self.warmup_ratio = warmup_ratio
        super().__init__(*args, **kwargs)
        # Our compute_loss divides by the trained-token count of the whole optimizer step itself.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.label_only_logits = label_only_logits and _accepts(base, "logits_to_keep")
        # No KV cache in training: it wastes memory, and with a cache transformers does not detect packed
        # sequences, so attention would silently cross sample boundaries.
        self.forward_kwargs = {"use_cache": False} if _accepts(base, "use_cache") else {}
        self.accounting = StepAccounting()

    # -- schedule -----------------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # transformers reads `warmup_steps` >= 1 as a step count and < 1 as a ratio, so a ratio of 1.0 would
        # warm up for one step: turn train.warmup_ratio into steps here, where the run's length is known.
        self.args.warmup_steps = math.ceil(num_training_steps * self.warmup_ratio)
        return super().create_scheduler(num_training_steps, optimizer)

    # -- loss ---------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sources = inputs.pop("sources", None) or []
        labels = inputs.pop("labels")
        target_mask = torch.zeros_like(labels, dtype=torch.bool)
        target_mask[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts token t+1
        targets = labels[:, 1:][target_mask[:, :-1]]
        if self.label_only_logits:
            outputs = model(**inputs, **self.forward_kwargs, logits_to_keep=target_mask)
            logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        else:
            outputs = model(**inputs, **self.forward_kwargs)
            logits = outputs.logits[target_mask]
        if self.chunked_loss:
            loss_sum = cross_entropy_sum(logits, targets)
        else:
            loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        n_trained = int(targets.numel())
        denominator = num_items_in_batch if num_items_in_batch is not None else max(n_trained, 1)
        loss = loss_sum / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; num_items counts all ranks
        if model.training:
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(inputs["input_ids"].numel())
            value = float(loss_sum.detach())
            if math.isfinite(value):
                self.accounting.add(self.state.global_step, value, n_trained, real)
            else:
                skip = self.on_nan == "skip"
                self.accounting.add_nonfinite(self.state.global_step, sources, skip)
                if skip:  # no gradient from this batch: a fresh zero with no graph behind it
                    loss = torch.zeros((), device=loss.device, requires_grad=True)
        return (loss, outputs) if return_outputs else loss

    # -- evaluation ---------------------------------------------------------------------------
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        # After the eval loss: `train.eval_generate=N` generates for the first N eval samples and adds the chosen
        # metrics, so they are logged, land in metrics.jsonl and can pick the best checkpoint (train.load_best).
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if self.generation_eval is not None:
            from chattune.evaluate.run import score

            tokenizer, template, samples, metrics, max_new_tokens = self.generation_eval
            result = score(self.accelerator.unwrap_model(self.model), tokenizer, template, samples, metrics,
                           max_new_tokens, self.args.per_device_eval_batch_size)
            for key in metric_columns(metrics):
                output.metrics[f"{metric_key_prefix}_{key}"] = result.metrics[key]
        return output

    # -- data order ---------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        if self.sample_order is not None:
            n = len(train_dataset if train_dataset is not None else self.train_dataset)
            if max(self.sample_order) >= n:
                raise DataError([f"the fixed sample order needs {max(self.sample_order) + 1} samples, the data "
                                 f"holds {n} after encoding"], "fix: raise data.max_length so no sample is dropped")
            return FixedOrderSampler(self.sample_order)
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            sampler = EpochSeededLengthGroupedSampler(sampler, self.args.seed)
        return sampler

    # -- checkpoints --------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        # transformers would rotate old checkpoints inside this call, before chattune's completion marker exists,
        # so a crash there could leave no complete checkpoint at all: it gets save_total_limit=None, and the
        # rotation runs here, after the new checkpoint is marked complete, counting complete checkpoints only.
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            outputs.mark_complete(run_dir / outputs.checkpoint_name(self.state.global_step), self.state.global_step)
            outputs.rotate_checkpoints(run_dir, self.keep_checkpoints, keep=self.state.best_model_checkpoint)


def _hash_file(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import peft
    import transformers

    return {"chattune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


# ================================================================ phase 1: prepare


@dataclass
class TrainOptions:
    """Seams for `chattune bench` and `compare`: a fixed sample order, padding of every (unpacked) batch to
    `pad_to` tokens, extra Trainer callbacks, and `baseline=True` for the stock transformers + peft kernels (no
    per-sample packed attention, fast adapter dropout, chunked loss or allocator setting)."""

    sample_order: list[int] | None = None
    pad_to: int | None = None
    callbacks: tuple = ()
    baseline: bool = False


@dataclass
class PreparedRun:
    """Everything the later phases need, decided once: readable by tests and by callers of `train()`."""

    cfg: RunConfig
    device: str
    method: Method
    precision: str
    precision_reason: str
    model: torch.nn.Module
    tokenizer: object
    template: Template
    model_path: str
    data: PreparedData
    packing: bool
    trainable_params: int
    total_params: int
    output_dir: Path
    resume_from: Path | None
    eval_samples: list = field(default_factory=list)  # for train.eval_generate: the first N eval records


def load_for_training(cfg: RunConfig, precision: str, log=print, device: str | None = None):
    """Tokenizer, template and model for `cfg`, the method not yet applied. Returns (model, tokenizer, template,
    model_path)."""
    method = get_method(cfg.method)
    path = resolve_model_path(cfg.model.path, log, cfg.model.revision)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code, cfg.model.revision)
    # Adapter methods never update the base weights, so they need no fp32 master copy: load them in the training
    # precision (on CPU too: autocast would otherwise re-cast every frozen weight to bf16 at every step, ~10% of a
    # LoRA step, and keep both copies in memory). Methods that train base weights keep fp32 master weights.
    load_dtype = torch.float32 if method.trains_base_weights else torch_dtype(precision)
    model = load_model(path, load_dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation, cfg.model.revision,
                       **method.load_kwargs(cfg, load_dtype))
    template = get_template(cfg.template, tokenizer, model_type(path), generation_stop_ids(model))
    log(f"template: {template.name} ({template.chosen_because})")
    return model, tokenizer, template, path


def check_output_dir(cfg: RunConfig) -> bool:
    """Refuse an output_dir holding another run unless resume= or overwrite=true. Returns whether an old run is
    to be cleared; that happens only once model and data have loaded, so a bad input loses nothing."""
    out = Path(cfg.output_dir)
    if cfg.resume is None and outputs.holds_a_run(out):
        if not cfg.overwrite:
            raise ConfigError(f"output_dir {out} already holds a run; continue it with resume=auto, replace it with "
                              "overwrite=true, or choose another output_dir=")
        return True
    return False


def check_resume_matches(cfg: RunConfig, resume_from: Path | None) -> None:
    """A resumed run must be the same run: the same base model and method as the one that wrote the checkpoint."""
    if resume_from is None:
        return
    info = outputs.read_info(cfg.output_dir)
    changed = [f"{key} was {info[key]!r}, now {now!r}" for key, now in
               (("model_spec", cfg.model.path), ("method", cfg.method)) if key in info and info[key] != now]
    if changed:
        raise ConfigError(f"resume={cfg.resume}: {cfg.output_dir} holds a run with another setup ({'; '.join(changed)}); "
                          "resume it with its own settings, or start anew with overwrite=true or another output_dir=")


def decide_precision(cfg: RunConfig, device: str) -> tuple[str, str]:
    """A run decides its precision once. A resumed run reuses the one its chattune.json recorded, so that a busy
    machine (or a changed probe) cannot switch a run from bf16 to fp32 halfway."""
    if cfg.resume is not None:
        recorded = outputs.read_info(cfg.output_dir).get("precision")
        if recorded and cfg.train.precision in ("auto", recorded):
            return recorded, "recorded by the run being resumed"
    return choose_precision(cfg.train.precision, device)


def is_main_process() -> bool:
    """Rank 0 of a torchrun / DeepSpeed launch (or a single process): the one that logs and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare(cfg: RunConfig, log=print, options: TrainOptions | None = None) -> PreparedRun:
    """Check the output folder and resume point, load model and data, choose packing, apply the method. Nothing is
    written to output_dir yet, so a bad input loses nothing."""
    options = options or TrainOptions()
    device = device_type()
    clear_old_run = check_output_dir(cfg)
    resume_from = outputs.resolve_resume(cfg.output_dir, cfg.resume)  # a bad resume= fails before any work
    check_resume_matches(cfg, resume_from)
    method = get_method(cfg.method)
    method.preflight(cfg, device)
    distributed_engine = bool(cfg.train.deepspeed or cfg.train.fsdp)
    check_compile(cfg.train.compile, device, distributed_engine)
    if device == "cpu":
        threads = set_cpu_threads(cfg.train.num_threads, int(os.environ.get("WORLD_SIZE", "1")))
        log(f"device: cpu, {threads} threads")
        if not options.baseline:
            keep_freed_memory()  # reuse freed memory instead of page-faulting fresh memory in every step
    precision, why = decide_precision(cfg, device)
    log(f"precision: {precision} ({why})")
    model, tokenizer, template, model_path = load_for_training(cfg, precision, log, device)
    data = prepare_data(cfg, tokenizer, template, log)
    st = data.stats
    log(f"data: {len(data.train)} training samples ({st.truncated} longer than {cfg.data.max_length} tokens: "
        f"{st.dropped} dropped, {st.answers_cut} with an answer cut" + (f", {len(data.skipped)} invalid skipped" if data.skipped else "") + ")"
        + (f", {len(data.eval)} eval samples" if data.eval else ""))

    packing = cfg.data.packing and method.supports_packing
    family_reason = packing_off_reason(model.config)
    if packing and family_reason:
        log(f"packing: off ({family_reason})")
        packing = False
    if packing:  # packing_is_exact: two forward passes, run again only where the attention changed in between
        exact = not options.baseline and packed_attention.enable(model) and packing_is_exact(model)
        if not exact:
            packed_attention.disable(model)  # per-sample attention is an optimisation; never trade exactness for it
            exact = packing_is_exact(model)
        if not exact:
            log("packing: this model does not keep packed samples apart (position_ids); using padded batches")
            packing = False

    # Seed before the method creates its weights (LoRA A matrices, prefixes): train.seed alone decides them, not
    # whatever ran earlier in this process, so a resumed run continues the same run.
    set_seed(cfg.train.seed)
    model = method.apply(model, cfg, tokenizer)
    if device == "cpu" and not options.baseline:
        fast_dropout.apply(model)  # nn.Dropout's CPU random numbers cost ~1/4 of a LoRA step
    if cfg.train.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    t = cfg.train
    per_step = t.batch_size * t.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
    steps = t.max_steps if t.max_steps > 0 else math.ceil(math.ceil(len(data.train) / per_step) * t.epochs)
    compiled, why_compile = should_compile(t.compile, device, steps, distributed_engine)
    if not options.baseline:
        line = method.speed_up(model, cfg, distributed_engine=distributed_engine, compiled=compiled)
        if line:
            log(line)
    if compiled:
        log(f"compile: {compile_layers(model)} decoder layers ({why_compile}; the first steps include compiling)")
    trainable, total = count_parameters(model)
    log(f"method: {cfg.method}, trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"
        + _backward_reach(model))
    log(f"packing: {'on' if packing else 'off'}, label-only logits: {'on' if cfg.train.label_only_logits else 'off'}")

    eval_samples = []
    if cfg.train.eval_generate and cfg.data.eval:
        from chattune.evaluate.run import load_samples

        eval_samples = load_samples(cfg.data.eval, cfg.train.eval_generate, cfg.data.format, split="eval")
        log(f"eval: loss on {len(data.eval or [])} samples every {cfg.train.eval_steps} steps, plus "
            f"{', '.join(cfg.train.eval_metrics)} on the first {len(eval_samples)}")

    out = Path(cfg.output_dir)
    if clear_old_run and is_main_process():
        outputs.clear_run(out)
    return PreparedRun(cfg, device, method, precision, why, model, tokenizer, template, model_path, data, packing,
                       trainable, total, out, resume_from, eval_samples)


# ================================================================ phase 2: training arguments


def training_arguments(run: PreparedRun) -> TrainingArguments:
    t = run.cfg.train
    return TrainingArguments(
        output_dir=str(run.output_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # ChattuneTrainer rotates, once a new checkpoint is complete
        eval_strategy="steps" if run.data.eval is not None and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        load_best_model_at_end=t.load_best,
        metric_for_best_model=f"eval_{t.best_metric}" if t.load_best else None,
        greater_is_better=t.best_metric not in LOWER_IS_BETTER if t.load_best else None,
        prediction_loss_only=True,  # eval loss only: label-only logits are not per-position predictions
        seed=t.seed,
        bf16=run.precision == "bf16",
        fp16=run.precision == "fp16",
        use_cpu=run.device == "cpu",
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if t.gradient_checkpointing else {}),
        train_sampling_strategy="group_by_length" if (t.group_by_length and not run.packing) else "random",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every trainable parameter is used in every forward pass
        report_to="none",
        dataloader_num_workers=0,
        deepspeed=str(resolve_deepspeed_config(t.deepspeed)) if t.deepspeed else None,
        **({"fsdp": True, "fsdp_config": str(resolve_shipped_json(t.fsdp_config, "train.fsdp_config"))}
           if t.fsdp else {}),
    )


# ================================================================ phase 3: trainer and callbacks


def build_trainer(run: PreparedRun, args: TrainingArguments, options: TrainOptions | None = None,
                  log=print) -> ChattuneTrainer:
    options = options or TrainOptions()
    t = run.cfg.train
    collator = make_collator(run.packing, run.tokenizer.pad_token_id, pad_to=options.pad_to)
    trainer = ChattuneTrainer(model=run.model, args=args, train_dataset=run.data.train, eval_dataset=run.data.eval,
                              data_collator=collator, label_only_logits=t.label_only_logits,
                              sample_order=options.sample_order, chunked_loss=not options.baseline,
                              warmup_ratio=t.warmup_ratio, on_nan=t.on_nan, save_total_limit=t.save_total_limit,
                              generation_eval=(run.tokenizer, run.template, run.eval_samples, t.eval_metrics,
                                               t.eval_max_new_tokens) if run.eval_samples else None)
    # One progress bar and no printed log dicts, whatever transformers chose (it picks PrinterCallback, which
    # prints raw dicts, when its logger is quieter than WARNING — as chattune sets it).
    trainer.pop_callback(PrinterCallback)
    trainer.pop_callback(ProgressCallback)
    metrics = MetricsCallback(trainer.accounting, run.output_dir / outputs.METRICS_FILE)
    trainer.add_callback(metrics)  # before the bar, which shows its latest tokens/s
    trainer.add_callback(QuietProgressCallback(metrics))  # (draws on rank 0 only)
    trainer.add_callback(NanGuardCallback(trainer.accounting, log))
    trainer.add_callback(InterruptCallback())
    if t.stop_after:
        trainer.add_callback(StopAfterCallback(t.stop_after))
    for callback in options.callbacks:
        trainer.add_callback(callback)
    return trainer


# ================================================================ phase 4: fit


def start_output_dir(run: PreparedRun, log=print) -> None:
    """Write the run's config and chattune.json, and cut metrics.jsonl back to the resumed step (rank 0 only)."""
    if not is_main_process():
        return
    out = run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_text(out / outputs.CONFIG_FILE, run.cfg.to_yaml())
    metrics_path = out / outputs.METRICS_FILE
    if run.resume_from is not None:
        step = json.loads((run.resume_from / "trainer_state.json").read_text())["global_step"]
        outputs.truncate_metrics(metrics_path, step)
        log(f"resuming from {run.resume_from} (step {step})")
    else:
        if run.cfg.resume == "auto":
            log(f"resume=auto: no complete checkpoint in {out}, starting from step 0")
        metrics_path.unlink(missing_ok=True)
    outputs.write_info(out, {"chattune_version": __version__, "base_model": run.model_path,
                             "model_spec": run.cfg.model.path, "trust_remote_code": run.cfg.model.trust_remote_code,
                             "revision": run.cfg.model.revision,
                             "method": run.cfg.method, "template": run.cfg.template,
                             "full_model": run.method.saves_full_model, "precision": run.precision})


def _callback(trainer: Trainer, kind: type):
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, kind))


def _last_checkpoint_note(out: Path) -> str:
    done = outputs.complete_checkpoints(out)
    return f"the last complete checkpoint is {done[-1][1]}" if done else "there is no complete checkpoint yet"


def fit(run: PreparedRun, trainer: ChattuneTrainer, log=print) -> float:
    """Train (from the resume point, if any); returns the seconds spent. Failures become errors that say what
    happened, what was kept and what to change; a Ctrl-C saves a checkpoint first."""
    start_output_dir(run, log)
    reset_peak_memory(run.device)  # run.json's peak is the training peak (model and data already loaded)
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        raise OutOfMemory(run, e) from None
    except RuntimeError as e:
        if "out of memory" in str(e) or "can't allocate memory" in str(e):
            raise OutOfMemory(run, e) from None
        raise
    except OSError as e:
        raise ChattuneError(f"training stopped: a file could not be written ({e.strerror or e}: "
                            f"{e.filename or 'in ' + str(run.output_dir)}); {_last_checkpoint_note(run.output_dir)}, "
                            "and it is intact.\nfix: free disk space (or choose another output_dir=), then run "
                            "the same command with resume=auto") from None
    seconds = time.perf_counter() - start
    guard = _callback(trainer, NanGuardCallback)
    if guard.bad_step is not None:
        records = ", ".join(guard.bad_sources[:10]) + (" ..." if len(guard.bad_sources) > 10 else "")
        raise DataError([f"training stopped: the loss became non-finite (NaN/inf) at step {guard.bad_step}"
                         + (f", in the batch of records {records}" if records else "")
                         + f"; this step was not saved and {_last_checkpoint_note(run.output_dir)}"],
                        "fix: lower train.lr, use train.precision=fp32, check those records, or set "
                        "train.on_nan=skip to drop such batches; then resume=auto")
    interrupt = _callback(trainer, InterruptCallback)
    if interrupt.interrupted:
        step = trainer.state.global_step
        raise TrainingInterrupted(f"interrupted at step {step}; saved {run.output_dir / outputs.checkpoint_name(step)}."
                                  "\nto continue: run the same command with resume=auto")
    return seconds


class TrainingInterrupted(ChattuneError):
    exit_code = 130


class OutOfMemory(ChattuneError):
    def __init__(self, run: PreparedRun, error: BaseException):
        t, d = run.cfg.train, run.cfg.data
        where = "GPU" if run.device == "cuda" else "CPU RAM"
        advice = [f"train.batch_size={max(1, t.batch_size // 2)} train.grad_accum={t.grad_accum * 2} (same "
                  "effective batch)", f"data.max_length={max(8, d.max_length // 2)}"]
        if not t.gradient_checkpointing and run.method.supports_packing:
            advice.append("train.gradient_checkpointing=true")
        if run.device == "cuda" and run.method.base_weight_bits(run.cfg) is None:
            advice.append("method=qlora (a 4-bit base)")
        super().__init__(f"training ran out of memory ({where}: {str(error).splitlines()[0][:200]}); "
                         f"{_last_checkpoint_note(run.output_dir)}.{_estimate_note(run)}\nfix: try "
                         + ", or ".join(advice) + "; then resume=auto (`chattune estimate` with the same settings "
                         "shows what each change saves)")


def _estimate_note(run: PreparedRun) -> str:
    """`chattune estimate`'s figure for this run, for the out-of-memory message (empty if it cannot say)."""
    try:
        from chattune.estimate import estimate

        e = estimate(run.cfg, log=lambda m: None) if run.device == "cpu" else \
            estimate(run.cfg, gpus=max(1, torch.cuda.device_count()), log=lambda m: None)
        return f" chattune estimate puts this run at {e.total_bytes / 2**30:.1f} GiB per device."
    except Exception:  # noqa: BLE001 - the estimate is a hint; never let it hide the real error
        return ""


# ================================================================ phase 5: finalize


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    trainable_params: int
    total_params: int
    train_seconds: float
    tokens_per_s: float
    peak_memory_mb: float
    stopped_early: bool = False
    run: PreparedRun | None = field(default=None, repr=False)  # the trained model, tokenizer and template


def save_final(trainer: Trainer, run: PreparedRun) -> None:
    """Write the final adapter/model, the tokenizer and the files that make other tools prompt and stop as chattune
    does (chat_template.jinja; generation_config.json's eos for a full model) into a temp folder, then move the
    files into place."""
    from chattune.data.jinja import write_generation_config, write_template_files

    if not trainer.args.should_save:
        if trainer.is_deepspeed_enabled:  # ZeRO-3 gathers the weights on save: every rank must take part
            trainer.save_model(None)  # (only rank 0 writes; the Trainer's default output_dir is never used here)
        return
    out = run.output_dir
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        trainer.save_model(str(tmp))
        run.tokenizer.save_pretrained(str(tmp))
        write_template_files(tmp, run.template, run.tokenizer)
        if run.method.saves_full_model:
            write_generation_config(tmp, run.template, run.tokenizer)
        for f in tmp.iterdir():
            target = out / f.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def best_checkpoint(run: PreparedRun, trainer: ChattuneTrainer) -> dict | None:
    """With train.load_best: which evaluated checkpoint won (the Trainer has loaded it back at the end)."""
    state = trainer.state
    if not run.cfg.train.load_best or not state.best_model_checkpoint:
        return None
    step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1])
    return {"step": step, "metric": run.cfg.train.best_metric, "value": state.best_metric,
            "checkpoint": state.best_model_checkpoint}


def finalize(run: PreparedRun, trainer: ChattuneTrainer, seconds: float, log=print) -> TrainResult:
    """Save the final model and write run.json (last: its presence means the run finished)."""
    cfg, state, acc = run.cfg, trainer.state, trainer.accounting
    best = best_checkpoint(run, trainer)
    if best:
        log(f"best checkpoint: step {best['step']} ({best['metric']} = {best['value']:.4f}); it is the final output")
    stopped_early = bool(cfg.train.stop_after and state.global_step < state.max_steps)
    save_final(trainer, run)
    result = TrainResult(run.output_dir, state.global_step, acc.last_logged_loss, run.trainable_params,
                         run.total_params, seconds, acc.total_tokens / seconds if seconds else 0.0,
                         peak_memory_mb(run.device), stopped_early, run)
    st = run.data.stats
    if acc.skipped_batches:
        summary_skips = [{"step": step, "records": records} for step, records in acc.skipped_batches]
    else:
        summary_skips = []
    summary = {"versions": _versions(), "seed": cfg.train.seed, "device": run.device, "precision": run.precision,
               "precision_reason": run.precision_reason, "packing": run.packing, "method": cfg.method,
               "trainable_params": run.trainable_params, "total_params": run.total_params,
               "trainable_percent": 100 * run.trainable_params / run.total_params,
               "data": {"train": cfg.data.train, "sha256": _hash_file(cfg.data.train), "samples": len(run.data.train),
                        "truncated": st.truncated, "dropped": st.dropped, "answers_cut": st.answers_cut,
                        "invalid_skipped": len(run.data.skipped)},
               "steps": result.steps, "final_loss": result.final_loss, "train_seconds": round(seconds, 3),
               "tokens_per_s": round(result.tokens_per_s, 2), "peak_memory_mb": round(result.peak_memory_mb, 1),
               "stopped_early": stopped_early, "model": run.model_path, "nonfinite_batches_skipped": summary_skips,
               "best": best}
    if trainer.args.should_save:
        outputs.atomic_write_text(run.output_dir / outputs.RUN_FILE, json.dumps(summary, indent=2) + "\n")
    return result


# ================================================================ the recipe


def _silent(*args, **kwargs) -> None:
    pass



def train(cfg: RunConfig, log=print, options: TrainOptions | None = None) -> TrainResult:
    """Run one training job: prepare -> training arguments -> trainer and callbacks -> fit -> finalize."""
    if not is_main_process():
        log = _silent  # one process speaks for a multi-process launch
    run = prepare(cfg, log, options)
    trainer = build_trainer(run, training_arguments(run), options, log)
    seconds = fit(run, trainer, log)
    return finalize(run, trainer, seconds, log)
