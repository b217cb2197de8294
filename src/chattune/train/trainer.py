"""The training recipe: config -> data -> model + method -> transformers' Trainer -> output_dir.

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
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from chattune import __version__
from chattune.config import RunConfig
from chattune.data.collate import PaddingCollator, make_collator
from chattune.data.encode import IGNORE, EncodeStats, encode_conversation
from chattune.data.formats import load_conversations
from chattune.data.templates import get_template
from chattune.errors import ConfigError, DataError
from chattune.inference import RUN_FILE
from chattune.hardware import device_type, keep_freed_memory, resolve_precision, set_cpu_threads, torch_dtype
from chattune.methods import count_parameters, get_method
from chattune.models.load import generation_stop_ids, load_model, load_tokenizer, model_type, resolve_model_path
from chattune.train import checkpoint as ckpt
from chattune.train import fast_dropout, packed_attention
from chattune.train.chunked_loss import cross_entropy_sum
from chattune.train.callbacks import MetricsCallback, NanGuardCallback, QuietProgressCallback, StopAfterCallback



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


def encode_file(path: str, cfg: RunConfig, tokenizer, template, split: str, stats: EncodeStats, skipped: list[str]):
    d = cfg.data
    loaded = load_conversations(path, split=split, fmt=d.format, skip_invalid=d.skip_invalid,
                                train_on=d.train_on, default_system=d.system)
    skipped.extend(loaded.problems)
    rows = []
    for conv in loaded.conversations:
        enc = encode_conversation(conv, template, tokenizer, d.max_length, d.truncation, stats)
        if enc is not None:
            rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return rows


def prepare_data(cfg: RunConfig, tokenizer, template) -> PreparedData:
    if not cfg.data.train:
        raise ConfigError("no training data: set data.train=FILE (.json/.jsonl, or a folder with a train split)")
    stats, skipped = EncodeStats(), []
    train_rows = encode_file(cfg.data.train, cfg, tokenizer, template, "train", stats, skipped)
    if not train_rows:
        raise DataError([f"{cfg.data.train}: every sample was dropped by data.truncation={cfg.data.truncation}"],
                        "fix: raise data.max_length")
    eval_rows = None
    if cfg.data.eval:
        eval_rows = encode_file(cfg.data.eval, cfg, tokenizer, template, "eval", EncodeStats(), skipped)
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


class ChattuneTrainer(Trainer):
    def __init__(self, *args, label_only_logits: bool = True, sample_order: list[int] | None = None,
                 chunked_loss: bool = True, **kwargs):
        self.sample_order = sample_order
        self.chunked_loss = chunked_loss  # False: plain F.cross_entropy (the stock recipe, for `chattune bench`)
        super().__init__(*args, **kwargs)
        # Our compute_loss divides by the trained-token count of the whole optimizer step itself.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.label_only_logits = label_only_logits and _accepts(base, "logits_to_keep")
        # No KV cache in training: it wastes memory, and with a cache transformers does not detect packed
        # sequences, so attention would silently cross sample boundaries.
        self.forward_kwargs = {"use_cache": False} if _accepts(base, "use_cache") else {}
        self._zero = torch.zeros((), dtype=torch.float64)
        self.reset_window()
        self._step_sum = self._step_tokens = None

    # -- accounting ---------------------------------------------------------------------------
    def reset_window(self) -> tuple[float | None, int, int]:
        """Return (mean loss, real tokens, trained tokens) since the last call, and start a new window."""
        loss_sum = float(getattr(self, "_win_sum", 0.0))
        trained = int(getattr(self, "_win_trained", 0))
        tokens = int(getattr(self, "_win_tokens", 0))
        self._win_sum, self._win_trained, self._win_tokens = 0.0, 0, 0
        return (loss_sum / trained if trained else None), tokens, trained

    @property
    def last_step_loss(self) -> float | None:
        if self._step_tokens:
            return self._step_sum / self._step_tokens
        return None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._micro == 0:
            self._step_sum, self._step_tokens = 0.0, 0
        self._micro = (self._micro + 1) % self.args.gradient_accumulation_steps
        return super().training_step(model, inputs, num_items_in_batch)

    _micro = 0

    # -- loss ---------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
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
            s = float(loss_sum.detach())
            self._win_sum += s
            self._win_trained += n_trained
            self._win_tokens += real
            self._step_sum = (self._step_sum or 0.0) + s
            self._step_tokens = (self._step_tokens or 0) + n_trained
        return (loss, outputs) if return_outputs else loss

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
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            path = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            ckpt.mark_complete(path, self.state.global_step)


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


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


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


def setup_model(cfg: RunConfig, log=print, device: str | None = None):
    """Load tokenizer, template and model for `cfg` (method not yet applied). Returns (model, tokenizer, template,
    model_path, precision)."""
    device = device or device_type()
    method = get_method(cfg.method)
    method.preflight(cfg, device)
    precision = resolve_precision(cfg.train.precision, device)
    path = resolve_model_path(cfg.model.path, log)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    # Adapter methods never update the base weights, so they need no fp32 master copy: load them in the training
    # precision (on CPU too: autocast would otherwise re-cast every frozen weight to bf16 at every step, ~10% of a
    # LoRA step, and keep both copies in memory). Methods that train base weights keep fp32 master weights.
    load_dtype = torch_dtype(precision) if cfg.method in ("lora", "qlora", "prefix") else torch.float32
    model = load_model(path, load_dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation,
                       **method.load_kwargs(cfg, load_dtype))
    template = get_template(cfg.template, tokenizer, model_type(path), generation_stop_ids(model))
    return model, tokenizer, template, path, precision


def check_output_dir(cfg: RunConfig) -> bool:
    """Refuse an output_dir holding another run unless resume= or overwrite=true. Returns whether an old run is
    to be cleared; that happens only once model and data have loaded, so a bad input loses nothing."""
    out = Path(cfg.output_dir)
    if cfg.resume is None and ckpt.holds_a_run(out):
        if not cfg.overwrite:
            raise ConfigError(f"output_dir {out} already holds a run; continue it with resume=auto, replace it with "
                              "overwrite=true, or choose another output_dir=")
        return True
    return False


def train(cfg: RunConfig, log=print, *, sample_order: list[int] | None = None, pad_to: int | None = None,
          callbacks: tuple = (), baseline: bool = False) -> TrainResult:
    """Run one training job. The keyword-only arguments are seams for `chattune bench`: a fixed sample order, padding
    of every (unpacked) batch to `pad_to` tokens, extra Trainer callbacks, and `baseline=True` for the stock
    transformers + peft kernels (no per-sample packed attention, fast adapter dropout, chunked loss or allocator
    setting)."""
    device = device_type()
    clear_old_run = check_output_dir(cfg)
    resume_from = ckpt.resolve_resume(cfg.output_dir, cfg.resume)  # a bad resume= fails before any work
    if device == "cpu":
        threads = set_cpu_threads(cfg.train.num_threads, int(os.environ.get("WORLD_SIZE", "1")))
        log(f"device: cpu, {threads} threads")
        if not baseline:
            keep_freed_memory()  # reuse freed memory instead of page-faulting fresh memory in every step
    method = get_method(cfg.method)
    model, tokenizer, template, model_path, precision = setup_model(cfg, log, device)
    data = prepare_data(cfg, tokenizer, template)
    st = data.stats
    log(f"data: {len(data.train)} training samples ({st.truncated} truncated to {cfg.data.max_length} tokens, "
        f"{st.dropped} dropped" + (f", {len(data.skipped)} invalid skipped" if data.skipped else "") + ")"
        + (f", {len(data.eval)} eval samples" if data.eval else ""))

    packing = cfg.data.packing and method.SUPPORTS_PACKING
    if packing and not baseline and packed_attention.enable(model) and not packing_is_exact(model):
        packed_attention.disable(model)  # per-sample attention is an optimisation; never trade exactness for it
    if packing and not packing_is_exact(model):
        log("packing: this model does not keep packed samples apart (position_ids); using padded batches")
        packing = False

    # Seed before the method creates its weights (LoRA A matrices, prefixes): train.seed alone decides them, not
    # whatever ran earlier in this process, so a resumed run continues the same run.
    from transformers import set_seed

    set_seed(cfg.train.seed)
    model = method.apply(model, cfg)
    if device == "cpu" and not baseline:
        fast_dropout.apply(model)  # nn.Dropout's CPU random numbers cost ~1/4 of a LoRA step
    if cfg.train.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    log(f"method: {cfg.method}, trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    log(f"precision: {precision}, packing: {'on' if packing else 'off'}, label-only logits: "
        f"{'on' if cfg.train.label_only_logits else 'off'}")

    out = Path(cfg.output_dir)
    if clear_old_run:
        ckpt.clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(out / "config.yaml", cfg.to_yaml())
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        step = json.loads((resume_from / "trainer_state.json").read_text())["global_step"]
        ckpt.truncate_metrics(metrics_path, step)
        log(f"resuming from {resume_from} (step {step})")
    elif cfg.resume == "auto":
        log(f"resume=auto: no complete checkpoint in {out}, starting from step 0")
        metrics_path.unlink(missing_ok=True)
    else:
        metrics_path.unlink(missing_ok=True)

    t = cfg.train
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if data.eval is not None and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        prediction_loss_only=True,  # eval loss only: label-only logits are not per-position predictions
        seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if t.gradient_checkpointing else {}),
        train_sampling_strategy="group_by_length" if (t.group_by_length and not packing) else "random",
        remove_unused_columns=False,
        report_to="none",
        dataloader_num_workers=0,
        deepspeed=t.deepspeed,
    )
    collator = make_collator(packing, tokenizer.pad_token_id, pad_to=pad_to)
    trainer = ChattuneTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                              data_collator=collator, label_only_logits=t.label_only_logits, sample_order=sample_order,
                              chunked_loss=not baseline)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgressCallback())
    trainer.add_callback(MetricsCallback(trainer, metrics_path))
    nan_guard = NanGuardCallback(trainer)
    trainer.add_callback(nan_guard)
    if t.stop_after:
        trainer.add_callback(StopAfterCallback(t.stop_after))
    for callback in callbacks:
        trainer.add_callback(callback)

    _write_run_file(out, cfg, model_path, template, method_saves_full=(cfg.method in ("freeze", "full")))
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    if nan_guard.bad_step is not None:
        raise DataError([f"training stopped: the loss became non-finite at step {nan_guard.bad_step}"],
                        "fix: lower train.lr, use train.precision=fp32, or check the data; earlier checkpoints are kept")

    stopped_early = bool(t.stop_after and trainer.state.global_step < trainer.state.max_steps)
    save_final(trainer, tokenizer, out)
    losses = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    train_losses = [r for r in losses if "loss" in r and r["loss"] is not None]
    total_tokens = sum(r.get("tokens", 0) for r in train_losses)
    result = TrainResult(out, trainer.state.global_step, train_losses[-1]["loss"] if train_losses else None,
                         trainable, total, seconds, total_tokens / seconds if seconds else 0.0,
                         peak_memory_mb(device), stopped_early)
    run = {"versions": _versions(), "seed": t.seed, "device": device, "precision": precision, "packing": packing,
           "method": cfg.method, "trainable_params": trainable, "total_params": total,
           "trainable_percent": 100 * trainable / total, "data": {"train": cfg.data.train,
           "sha256": _hash_file(cfg.data.train), "samples": len(data.train), "truncated": st.truncated,
           "dropped": st.dropped, "invalid_skipped": len(data.skipped)},
           "steps": result.steps, "final_loss": result.final_loss, "train_seconds": round(seconds, 3),
           "tokens_per_s": round(result.tokens_per_s, 2), "peak_memory_mb": round(result.peak_memory_mb, 1),
           "stopped_early": stopped_early, "model": model_path}
    if trainer.args.should_save:
        ckpt.atomic_write_text(out / "run.json", json.dumps(run, indent=2) + "\n")
    return result


def _write_run_file(out: Path, cfg: RunConfig, model_path: str, template, method_saves_full: bool) -> None:
    info = {"chattune_version": __version__, "base_model": model_path, "model_spec": cfg.model.path,
            "trust_remote_code": cfg.model.trust_remote_code, "method": cfg.method, "template": cfg.template,
            "full_model": method_saves_full}
    ckpt.atomic_write_text(out / RUN_FILE, json.dumps(info, indent=2) + "\n")


def save_final(trainer: Trainer, tokenizer, out: Path) -> None:
    """Write the final adapter/model and tokenizer into a temp folder, then move the files into place."""
    if not trainer.args.should_save:
        return
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            target = out / f.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
