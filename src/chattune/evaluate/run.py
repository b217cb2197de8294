"""`chattune eval`: score a tuned (or plain) model on a data file.

Each record's last assistant turn is the reference; everything before it is the prompt, rendered with the run's
own template (exactly as in training). Predictions are greedy and batched (generate.py). Writes, atomically:
- `predictions.jsonl`: per sample `source` (file:line), `prompt` (the rendered prompt text), `reference`,
  `prediction`;
- `metrics.json`: each metric, the sample count, generation seconds, generated tokens/s, peak memory.
The teacher-forced `loss` metric scores every trained token of each record (all assistant turns, as in
training) in one forward pass per batch, as training computes its loss: the output head runs only at the positions
that predict a trained token (label-only logits) and the cross-entropy goes a chunk of rows at a time
(train/chunked_loss.py), so no [batch, length, vocabulary] logits nor their fp32 copy are ever built; `perplexity`
is exp(loss). Generation prompts longer than the model's context less --max-new-tokens are cut from the left
(their end, the last user turn, is kept), and the log says how many. `chattune eval` encodes those records with the
run's data settings (`data.max_length`, `data.truncation`, `data.train_on`, `data.system`: the run's config.yaml,
changed by `key=value` overrides; see commands/eval.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chattune.data.encode import IGNORE, encode_conversations, encode_prompt
from chattune.data.formats import Conversation, load_conversations
from chattune.errors import DataError
from chattune.evaluate.generate import generate_batch
from chattune.evaluate.metrics import GENERATION_METRICS, compute_metrics, parse_metric_names
from chattune.outputs import atomic_write_text


@dataclass
class Sample:
    source: str
    prompt: Conversation  # everything before the last assistant turn
    reference: str
    full: Conversation  # the whole record (for the teacher-forced loss)


@dataclass
class EvalResult:
    metrics: dict
    predictions: list[dict] = field(default_factory=list)
    out_dir: Path | None = None


def reference_text(message) -> str:
    """An assistant turn as text: its content, or a tool call as `{"name": ..., "arguments": ...}` JSON."""
    if message.tool_call is not None:
        return json.dumps(message.tool_call, ensure_ascii=False)
    return message.content


def samples_from(conversations: list[Conversation]) -> list[Sample]:
    out = []
    for conv in conversations:
        last = conv.assistant_indices()[-1]
        prompt = Conversation(conv.messages[:last], system=conv.system, tools=conv.tools, source=conv.source)
        out.append(Sample(conv.source, prompt, reference_text(conv.messages[last]), conv))
    return out


def load_samples(path: str, limit: int | None = None, fmt: str = "auto", split: str = "test",
                 skip_invalid: bool = False, train_on: str = "all", default_system: str | None = None,
                 log=None, columns: dict[str, str] | None = None) -> list[Sample]:
    loaded = load_conversations(path, split=split, fmt=fmt, skip_invalid=skip_invalid, train_on=train_on,
                                default_system=default_system, columns=columns)
    for line in loaded.skip_report() if log else []:
        log(line)
    samples = samples_from(loaded.conversations)
    if not samples:
        raise DataError([f"{path}: no records with an assistant turn to score"])
    return samples[:limit] if limit else samples


@torch.no_grad()
def teacher_forced_loss(model, tokenizer, template, conversations: list[Conversation], max_length: int = 4096,
                        batch_size: int = 8, truncation: str = "right") -> tuple[float, int]:
    """Mean cross-entropy over the trained tokens of `conversations` (all assistant turns), and their count.
    Over-long conversations are cut (or dropped, or refused) by the `data.truncation` policy, as in training."""
    from chattune.data.collate import PaddingCollator
    from chattune.train.chunked_loss import cross_entropy_sum
    from chattune.train.packing import forward_accepts

    rows = [{"input_ids": enc.input_ids, "labels": enc.labels}
            for enc in encode_conversations(conversations, template, tokenizer, max_length, truncation)]
    collate = PaddingCollator(tokenizer.pad_token_id)  # models/load.py always sets a pad token
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    label_only = forward_accepts(base, "logits_to_keep")  # remote code may not take it: full logits, then picked
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()}
            labels = batch.pop("labels")
            predicts = torch.zeros_like(labels, dtype=torch.bool)  # position t predicts token t + 1
            predicts[:, :-1] = labels[:, 1:] != IGNORE
            targets = labels[:, 1:][predicts[:, :-1]]
            if label_only:
                logits = model(**batch, use_cache=False, logits_to_keep=predicts).logits
                logits = logits.reshape(-1, logits.shape[-1])
            else:
                logits = model(**batch, use_cache=False).logits[predicts]
            total += float(cross_entropy_sum(logits, targets))
            count += int(targets.numel())
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), count


def score(model, tokenizer, template, samples: list[Sample], metric_names: list[str], max_new_tokens: int = 256,
          batch_size: int = 8, progress=None, max_length: int = 4096, truncation: str = "right",
          log=None) -> EvalResult:
    """Generate for `samples` (if a generation metric is asked for) and compute the metrics. The building block of
    `chattune eval`, evaluation during training and `compare`. `max_length` / `truncation` apply to the loss
    metric's records only; generation prompts are cut to the model's context (`fit_prompts`), said through `log`
    (default: chattune's log, stderr)."""
    metrics: dict = {"samples": len(samples)}
    predictions: list[dict] = []
    if any(m in GENERATION_METRICS for m in metric_names):
        prompts = fit_prompts([encode_prompt(s.prompt, template, tokenizer) for s in samples], model, tokenizer,
                              max_new_tokens, log)
        start = time.perf_counter()
        generated = generate_batch(model, tokenizer, prompts, template.stop_tokens(tokenizer), max_new_tokens,
                                   batch_size, progress)
        seconds = time.perf_counter() - start
        new_tokens = sum(g.new_tokens for g in generated)
        metrics.update(compute_metrics(metric_names, [g.text for g in generated], [s.reference for s in samples]))
        metrics.update(generation_seconds=round(seconds, 3), generated_tokens=new_tokens,
                       generated_tokens_per_s=round(new_tokens / seconds, 2) if seconds else 0.0)
        for s, ids, g in zip(samples, prompts, generated):
            predictions.append({"source": s.source, "prompt": tokenizer.decode(ids), "reference": s.reference,
                                "prediction": g.text})
    if "loss" in metric_names:
        loss, tokens = teacher_forced_loss(model, tokenizer, template, [s.full for s in samples], max_length,
                                           batch_size, truncation)
        metrics.update(loss=loss, perplexity=math.exp(loss) if loss < 50 else float("inf"), loss_tokens=tokens)
    return EvalResult(metrics, predictions)


def fit_prompts(prompts: list[list[int]], model, tokenizer, max_new_tokens: int, log=None) -> list[list[int]]:
    """The prompts cut from the left to the model's context less `max_new_tokens` (generation.model_context), so
    that prompt and answer fit the positions the model was built for; a ConfigError where no prompt token would
    fit."""
    from chattune.errors import ConfigError
    from chattune.evaluate.generate import cut_prompts, model_context

    context = model_context(model, tokenizer)
    if context is None:
        return prompts
    room = context - max_new_tokens
    if room < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                          f"{context} tokens; give --max-new-tokens below {context}")
    prompts, cut = cut_prompts(prompts, room)
    if cut:
        from chattune.log import log as default_log

        (log or default_log)(f"eval: {cut} prompts longer than {room} tokens were cut from the left (the model's "
                             f"context is {context} tokens, {max_new_tokens} kept for the answer)")
    return prompts


def default_out_dir(source: str, data: str) -> Path:
    return Path(source) / f"eval-{Path(data).stem}"


def evaluate(adapter: str | None, model: str | None, data: str, metrics: str | list[str] = "rouge,bleu",
             batch_size: int = 8, max_new_tokens: int = 256, limit: int | None = None, out: str | None = None,
             template: str | None = None, log=print, data_config=None, trust_remote_code: bool | None = None,
             dtype: torch.dtype = torch.float32, packed: bool = False, decode_step: bool = False,
             attn_implementation: str | None = None, revision: str | None = None, device: str | None = None,
             device_map: str | None = None, placement_why: str | None = None) -> EvalResult:
    """`data_config` (a config.DataConfig; `chattune eval` passes the run's, with its overrides) says how records
    are read and, for the loss metric, encoded; `template`, `trust_remote_code`, `dtype`, `device`, `device_map`,
    `placement_why`, `packed`, `attn_implementation`, `revision` go to `load_tuned`. `decode_step`: generation
    decodes through chattune's own step where its start-up check passes (models/decode_step.py). Both off by
    default, so predictions are transformers' own computation. metrics.json records where the model really ran (its
    parameters' device and dtype) and that device's peak memory (hardware.peak_memory_of)."""
    from chattune.config import DataConfig
    from chattune.hardware import PRECISION_NAMES, peak_memory_of, placed_on, reset_peak_memory_of
    from chattune.inference import check_adapter, load_tuned
    from chattune.models.checks import model_dtype

    d = data_config or DataConfig()
    names = parse_metric_names(metrics)
    if adapter:
        check_adapter(adapter)
    samples = load_samples(data, limit, d.format, skip_invalid=d.skip_invalid, train_on=d.train_on, columns=d.columns,
                           default_system=d.system, log=log)  # bad data fails before the model loads
    tuned = load_tuned(adapter=adapter, model=model, template=template, trust_remote_code=trust_remote_code,
                       dtype=dtype, log=log, packed=packed, attn_implementation=attn_implementation,
                       revision=revision, device=device, device_map=device_map, placement_why=placement_why)
    where = placed_on(tuned.model)
    step = False
    if decode_step:
        from chattune.models.decode_step import enable_for_generate

        step = enable_for_generate(tuned.model, tuned.pad_id, log)
    reset_peak_memory_of(where)
    log(f"eval: {len(samples)} samples from {data}; metrics: {', '.join(names)}"
        + (f" (loss: data.max_length={d.max_length}, data.truncation={d.truncation})" if "loss" in names else ""))
    bar = _progress_bar(len(samples)) if any(m in GENERATION_METRICS for m in names) else None
    result = score(tuned.model, tuned.tokenizer, tuned.template, samples, names, max_new_tokens, batch_size,
                   progress=bar.update if bar else None, max_length=d.max_length, truncation=d.truncation, log=log)
    if bar:
        bar.close()
    result.metrics["peak_memory_mb"] = round(peak_memory_of(where), 1)
    computes_in = model_dtype(tuned.model)
    result.metrics.update(data=str(data), model=tuned.source, device=where, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, template=tuned.template.name,
                          precision=PRECISION_NAMES.get(computes_in, str(computes_in)),
                          quantized=_quantized(tuned.model),
                          packed_layers=sum(hasattr(m, "_chattune_packed") for m in tuned.model.modules()),
                          decode_step="chattune" if step else "transformers")
    if "loss" in names:
        result.metrics.update(max_length=d.max_length, truncation=d.truncation)
    out_dir = Path(out) if out else default_out_dir(tuned.source, data)
    out_dir.mkdir(parents=True, exist_ok=True)
    if result.predictions:
        atomic_write_text(out_dir / "predictions.jsonl",
                          "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions))
    atomic_write_text(out_dir / "metrics.json", json.dumps(result.metrics, indent=2, ensure_ascii=False) + "\n")
    result.out_dir = out_dir
    print(format_table(result.metrics))
    log(f"eval: wrote {out_dir / 'metrics.json'}" + (" and predictions.jsonl" if result.predictions else ""))
    return result


def _quantized(model) -> str | None:
    """`4-bit` / `8-bit` for a base loaded quantized by bitsandbytes (a QLoRA run), else None."""
    config = getattr(model, "config", None)
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    get = quant.get if isinstance(quant, dict) else lambda k, d=None: getattr(quant, k, d)
    return "4-bit" if get("load_in_4bit", False) else "8-bit" if get("load_in_8bit", False) else None


class _Bar:
    """Shown from the first finished batch on, so that the lines logged before generation starts (prompts cut to
    the context) are not written into it."""

    def __init__(self, total: int):
        self.total, self.tqdm = total, None

    def update(self, done: int, total: int, seconds: float) -> None:
        if self.tqdm is None:
            from tqdm import tqdm

            self.tqdm = tqdm(total=self.total, unit="sample", desc="generating", leave=False)
        self.tqdm.n = done
        self.tqdm.set_postfix_str(f"{done / seconds:.2f} samples/s" if seconds else "", refresh=False)
        self.tqdm.refresh()

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


def _progress_bar(total: int):
    return _Bar(total) if total else None


_ORDER = ["samples", "rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact", "triple_p", "triple_r", "triple_f1",
          "loss", "perplexity", "generation_seconds", "generated_tokens_per_s", "peak_memory_mb"]


def format_table(metrics: dict) -> str:
    rows = [(k, metrics[k]) for k in _ORDER if k in metrics]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows)
