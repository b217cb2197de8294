"""`ChattuneTrainer`: what chattune adds to transformers' Trainer (and why it is written here rather than taken from a
library):
- label-only logits: the output head runs only where a label is set (`logits_to_keep` as a boolean mask),
  because over a 49k-150k vocabulary the head costs as much as several layers and prompt tokens carry no loss;
- a loss normalised by the number of trained tokens in the whole optimizer step (exact under gradient
  accumulation), with per-step accounting of loss and real tokens for metrics.jsonl;
- checkpoints marked complete atomically, so `resume=auto` never picks a half-written one;
- chattune's figures (exact loss, real tokens/s, trained tokens) put into the Trainer's own log dict, so that
  metrics.jsonl, the progress bar and every tracker of `train.report_to` get the same numbers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer

from chattune import outputs
from chattune.data.encode import IGNORE
from chattune.evaluate.metrics import metric_columns
from chattune.train.accounting import StepAccounting
from chattune.train.chunked_loss import cross_entropy_sum
from chattune.train.packing import forward_accepts
from chattune.train.samplers import fixed_order_sampler, train_sampler
from chattune.train.trackers import tracker_environment


class ChattuneTrainer(Trainer):
    """transformers' Trainer with chattune's loss (label-only logits, per-step token normalisation, on_nan=skip),
    step accounting, warmup ratio, generation metrics at evaluation, sample order and checkpoint rotation."""

    def __init__(self, *args, label_only_logits: bool = True, sample_order: list[int] | None = None,
                 chunked_loss: bool = True, warmup_ratio: float = 0.0, on_nan: str = "stop",
                 save_total_limit: int | None = None, generation_eval=None, log=print, **kwargs):
        self.sample_order = sample_order
        self.generation_eval = generation_eval  # (tokenizer, template, samples, metrics, max_new_tokens) or None
        self.on_nan = on_nan
        self.keep_checkpoints = save_total_limit  # rotation is ours: see _save_checkpoint
        self.chunked_loss = chunked_loss  # False: plain F.cross_entropy (the stock recipe, for `chattune bench`)
        self.warmup_ratio = warmup_ratio
        self.log_line = log  # chattune's printed lines (`log` is the Trainer's method)
        self.window_start: float | None = None  # start of the current logging window (real tokens/s)
        super().__init__(*args, **kwargs)
        # Our compute_loss divides by the trained-token count of the whole optimizer step itself.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.label_only_logits = label_only_logits and forward_accepts(base, "logits_to_keep")
        # No KV cache in training: it wastes memory, and with a cache transformers does not detect packed
        # sequences, so attention would silently cross sample boundaries.
        self.forward_kwargs = {"use_cache": False} if forward_accepts(base, "use_cache") else {}
        self.accounting = StepAccounting()

    # -- training and logging -----------------------------------------------------------------
    def train(self, *args, **kwargs):
        self.accounting.take_window()  # a fresh window; its clock starts at the first training step
        self.window_start = None
        with tracker_environment(self.args.report_to, self.args.output_dir, self.log_line):
            return super().train(*args, **kwargs)

    def training_step(self, *args, **kwargs):
        if self.window_start is None:
            self.window_start = time.perf_counter()
        return super().training_step(*args, **kwargs)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # Injected here, before the callbacks run, rather than in a callback: the trackers' callbacks are
        # registered first, so only the log dict itself reaches them all with chattune's numbers.
        if "loss" in logs:
            logs.update(self._window_figures())
        super().log(logs, start_time)

    def _window_figures(self) -> dict:
        """The training log line's own figures since the previous one: the exact loss (token-weighted over the
        window, where transformers averages per-step losses) replaces `loss`; real and trained tokens, real
        tokens/s. Every rank takes its window (a collective in a multi-process run)."""
        now = time.perf_counter()
        loss, tokens, trained = self.accounting.take_window(across_ranks=True)
        elapsed = max(now - (self.window_start or now), 1e-9)
        self.window_start = now
        figures = {"tokens": tokens, "tokens_per_s": round(tokens / elapsed, 2), "trained_tokens": trained}
        return figures if loss is None else {"loss": loss, **figures}

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
            return fixed_order_sampler(self.sample_order, n)
        return train_sampler(super()._get_train_sampler(train_dataset), self.args.seed)

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
