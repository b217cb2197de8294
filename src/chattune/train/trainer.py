"""The training recipe, in named phases: prepare (model, data, packing, method) -> training arguments -> trainer
and callbacks -> fit -> finalize (final save, run.json). `train()` at the bottom runs them in order; the parts the
phases call live beside it in train/: setup, dataset, packing, hf_trainer, samplers, accounting, run_files, errors.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from chattune import outputs
from chattune.config import RunConfig
from chattune.data.collate import make_collator
from chattune.data.templates import Template
from chattune.evaluate.metrics import LOWER_IS_BETTER
from chattune.hardware import decide_precision, device_type, keep_freed_memory, peak_memory_mb, reset_peak_memory, \
    set_cpu_threads
from chattune.methods import count_parameters, get_method
from chattune.methods.base import Method
from chattune.methods.common import resolve_deepspeed_config, resolve_shipped_json
from chattune.train import fast_dropout, trackers
from chattune.train.accounting import planned_steps
from chattune.train.callbacks import InterruptCallback, MetricsCallback, NanGuardCallback, QuietProgressCallback, \
    StopAfterCallback
from chattune.train.compile import check_compile, compile_layers, should_compile
from chattune.train.dataset import PreparedData, data_line, generation_eval_samples, prepare_data
from chattune.train.errors import OutOfMemory, TrainingInterrupted, nonfinite_loss, write_failed
from chattune.train.hf_trainer import ChattuneTrainer
from chattune.train.gpu_options import check_liger, choose_optimizer
from chattune.train.neftune import checked_alpha
from chattune.train.options import TrainOptions
from chattune.train.packing import decide_packing
from chattune.train.run_files import best_checkpoint, run_summary, save_final, start_output_dir
from chattune.train.setup import backward_reach, check_output_dir, check_resume_matches, is_main_process, \
    load_for_training


# ================================================================ phase 1: prepare


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
    trackers.preflight(cfg.train.report_to)  # a tracker's missing package, before any work
    check_liger(cfg.train.liger, device)
    optimizer = optimizer_choice(cfg, device)  # a bad or unusable train.optim, before any work
    distributed_engine = bool(cfg.train.deepspeed or cfg.train.fsdp)
    check_compile(cfg.train.compile, device, distributed_engine)
    if device == "cpu":
        threads = set_cpu_threads(cfg.train.num_threads, int(os.environ.get("WORLD_SIZE", "1")))
        log(f"device: cpu, {threads} threads")
        if not options.baseline:  # options: bench's stock baseline keeps glibc's default allocator
            keep_freed_memory()  # reuse freed memory instead of page-faulting fresh memory in every step
    # A run decides its precision once. A resumed run reuses the one its chattune.json recorded, so that a busy
    # machine (or a changed probe) cannot switch a run from bf16 to fp32 halfway.
    recorded = outputs.read_info(cfg.output_dir).get("precision") if cfg.resume is not None else None
    precision, why = decide_precision(cfg.train.precision, device, recorded, "recorded by the run being resumed")
    log(f"precision: {precision} ({why})")
    model, tokenizer, template, model_path = load_for_training(cfg, precision, log, device)
    data = prepare_data(cfg, tokenizer, template, log)
    log(data_line(data, cfg.data.max_length))
    # options: bench's stock baseline packs without chattune's per-sample attention
    packing = decide_packing(cfg, method, model, per_sample_attention=not options.baseline, log=log)

    # Seed before the method creates its weights (LoRA A matrices, prefixes): train.seed alone decides them, not
    # whatever ran earlier in this process, so a resumed run continues the same run.
    set_seed(cfg.train.seed)
    model = method.apply(model, cfg, tokenizer)
    if device == "cpu" and not options.baseline:  # options: the baseline keeps peft's own dropout
        fast_dropout.apply(model)  # nn.Dropout's CPU random numbers cost ~1/4 of a LoRA step
    if cfg.train.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    t = cfg.train
    compiled, why_compile = should_compile(t.compile, device, planned_steps(t, len(data.train)), distributed_engine)
    if not options.baseline:  # options: the baseline keeps the method's stock modules
        line = method.speed_up(model, cfg, distributed_engine=distributed_engine, compiled=compiled)
        if line:
            log(line)
    if compiled:
        log(f"compile: {compile_layers(model)} decoder layers ({why_compile}; the first steps include compiling)")
    trainable, total = count_parameters(model)
    log(f"method: {cfg.method}, trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"
        + backward_reach(model))
    log(f"packing: {'on' if packing else 'off'}, label-only logits: {'on' if cfg.train.label_only_logits else 'off'}")
    log(f"optimizer: {'; '.join(optimizer)}" + (", liger-kernel: on" if cfg.train.liger else ""))
    eval_samples = generation_eval_samples(cfg, data, log)

    out = Path(cfg.output_dir)
    if clear_old_run and is_main_process():
        outputs.clear_run(out)
    return PreparedRun(cfg, device, method, precision, why, model, tokenizer, template, model_path, data, packing,
                       trainable, total, out, resume_from, eval_samples)


# ================================================================ phase 2: training arguments


def optimizer_choice(cfg: RunConfig, device: str) -> tuple[str, str]:
    """train.optim for this run (train/gpu_options.py); a DeepSpeed config's own optimizer counts."""
    ds_optimizer = False
    if cfg.train.deepspeed:
        import json

        ds_optimizer = "optimizer" in json.loads(resolve_deepspeed_config(cfg.train.deepspeed).read_text())
    return choose_optimizer(cfg.train.optim, device, ds_optimizer)


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
        optim=optimizer_choice(run.cfg, run.device)[0],  # train/gpu_options.py
        use_liger_kernel=t.liger,
        neftune_noise_alpha=checked_alpha(run.model, t.neftune_noise_alpha),  # transformers' NEFTune (train/neftune.py)
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if t.gradient_checkpointing else {}),
        train_sampling_strategy="group_by_length" if (t.group_by_length and not run.packing) else "random",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every trainable parameter is used in every forward pass
        report_to=list(t.report_to),  # transformers' own tracker integrations (train/trackers.py)
        run_name=run.output_dir.resolve().name,
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
    # options: `chattune bench` pads every batch to one length, fixes the sample order, and (its baseline) takes
    # the stock cross-entropy instead of the chunked loss
    collator = make_collator(run.packing, run.tokenizer.pad_token_id, pad_to=options.pad_to)
    trainer = ChattuneTrainer(model=run.model, args=args, train_dataset=run.data.train, eval_dataset=run.data.eval,
                              data_collator=collator, label_only_logits=t.label_only_logits,
                              sample_order=options.sample_order, chunked_loss=not options.baseline,
                              warmup_ratio=t.warmup_ratio, on_nan=t.on_nan, save_total_limit=t.save_total_limit,
                              generation_eval=(run.tokenizer, run.template, run.eval_samples, t.eval_metrics,
                                               t.eval_max_new_tokens) if run.eval_samples else None, log=log)
    # One progress bar and no printed log dicts, whatever transformers chose (it picks PrinterCallback, which
    # prints raw dicts, when its logger is quieter than WARNING — as chattune sets it).
    trainer.pop_callback(PrinterCallback)
    trainer.pop_callback(ProgressCallback)
    metrics = MetricsCallback(run.output_dir / outputs.METRICS_FILE)
    trainer.add_callback(metrics)  # before the bar, which shows its latest tokens/s
    trainer.add_callback(QuietProgressCallback(metrics))  # (draws on rank 0 only)
    trainer.add_callback(NanGuardCallback(trainer.accounting, log))
    trainer.add_callback(InterruptCallback())
    if t.stop_after:
        trainer.add_callback(StopAfterCallback(t.stop_after))
    for callback in options.callbacks:  # options: bench's and compare's own callbacks
        trainer.add_callback(callback)
    return trainer


# ================================================================ phase 4: fit


def _callback(trainer: Trainer, kind: type):
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, kind))


def fit(run: PreparedRun, trainer: ChattuneTrainer, log=print) -> float:
    """Train (from the resume point, if any); returns the seconds spent. Failures become errors that say what
    happened, what was kept and what to change (errors.py); a Ctrl-C saves a checkpoint first."""
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
        raise write_failed(run, e) from None
    seconds = time.perf_counter() - start
    guard = _callback(trainer, NanGuardCallback)
    if guard.bad_step is not None:
        raise nonfinite_loss(run, guard.bad_step, guard.bad_sources)
    interrupt = _callback(trainer, InterruptCallback)
    if interrupt.interrupted:
        step = trainer.state.global_step
        raise TrainingInterrupted(f"interrupted at step {step}; saved {run.output_dir / outputs.checkpoint_name(step)}."
                                  "\nto continue: run the same command with resume=auto")
    return seconds


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
    summary = run_summary(run, result, best, acc.skipped_batches)
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
