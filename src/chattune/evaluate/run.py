"""`chattune eval`: score a tuned (or plain) model on a data file.

Each record's last assistant turn is the reference; everything before it is the prompt, rendered with the run's
own template (exactly as in training). Predictions are greedy and batched (generate.py). Writes, atomically:
- `predictions.jsonl`: per sample `source` (file:line), `prompt` (the rendered prompt text), `reference`,
  `prediction`;
- `metrics.json`: each metric, the sample count, generation seconds, generated tokens/s, peak memory.
The teacher-forced `loss` metric scores every trained token of each record (all assistant turns, as in
training) in one forward pass per batch; `perplexity` is exp(loss). `chattune eval` encodes those records with the
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
                 log=None) -> list[Sample]:
    loaded = load_conversations(path, split=split, fmt=fmt, skip_invalid=skip_invalid, train_on=train_on,
                                default_system=default_system)
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

    rows = [{"input_ids": enc.input_ids, "labels": enc.labels}
            for enc in encode_conversations(conversations, template, tokenizer, max_length, truncation)]
    collate = PaddingCollator(tokenizer.pad_token_id)  # models/load.py always sets a pad token
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()}
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            keep = labels != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), count


def score(model, tokenizer, template, samples: list[Sample], metric_names: list[str], max_new_tokens: int = 256,
          batch_size: int = 8, progress=None, max_length: int = 4096, truncation: str = "right") -> EvalResult:
    """Generate for `samples` (if a generation metric is asked for) and compute the metrics. The building block of
    `chattune eval`, evaluation during training and `compare`. `max_length` / `truncation` apply to the loss
    metric's records only; generation prompts are never cut."""
    metrics: dict = {"samples": len(samples)}
    predictions: list[dict] = []
    if any(m in GENERATION_METRICS for m in metric_names):
        prompts = [encode_prompt(s.prompt, template, tokenizer) for s in samples]
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


_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def default_out_dir(source: str, data: str) -> Path:
    return Path(source) / f"eval-{Path(data).stem}"


def evaluate(adapter: str | None, model: str | None, data: str, metrics: str | list[str] = "rouge,bleu",
             batch_size: int = 8, max_new_tokens: int = 256, limit: int | None = None, out: str | None = None,
             template: str | None = None, log=print, data_config=None, trust_remote_code: bool | None = None,
             dtype: torch.dtype = torch.float32, packed: bool = False, decode_step: bool = False,
             attn_implementation: str | None = None, revision: str | None = None) -> EvalResult:
    """`data_config` (a config.DataConfig; `chattune eval` passes the run's, with its overrides) says how records
    are read and, for the loss metric, encoded; `template`, `trust_remote_code`, `dtype`, `packed`,
    `attn_implementation`, `revision` go to `load_tuned`. `decode_step`: generation decodes through chattune's own
    step where its start-up check passes (models/decode_step.py). Both off by default, so predictions are
    transformers' own computation."""
    from chattune.config import DataConfig
    from chattune.hardware import device_type, peak_memory_mb, reset_peak_memory
    from chattune.inference import check_adapter, load_tuned

    d = data_config or DataConfig()
    names = parse_metric_names(metrics)
    if adapter:
        check_adapter(adapter)
    samples = load_samples(data, limit, d.format, skip_invalid=d.skip_invalid, train_on=d.train_on,
                           default_system=d.system, log=log)  # bad data fails before the model loads
    device = device_type()
    tuned = load_tuned(adapter=adapter, model=model, template=template, trust_remote_code=trust_remote_code,
                       dtype=dtype, log=log, packed=packed, attn_implementation=attn_implementation,
                       revision=revision)
    step = False
    if decode_step:
        from chattune.models.decode_step import enable_for_generate

        step = enable_for_generate(tuned.model, tuned.pad_id, log)
    reset_peak_memory(device)
    log(f"eval: {len(samples)} samples from {data}; metrics: {', '.join(names)}"
        + (f" (loss: data.max_length={d.max_length}, data.truncation={d.truncation})" if "loss" in names else ""))
    bar = _progress_bar(len(samples)) if any(m in GENERATION_METRICS for m in names) else None
    result = score(tuned.model, tuned.tokenizer, tuned.template, samples, names, max_new_tokens, batch_size,
                   progress=bar.update if bar else None, max_length=d.max_length, truncation=d.truncation)
    if bar:
        bar.close()
    result.metrics["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    result.metrics.update(data=str(data), model=tuned.source, device=device, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, template=tuned.template.name,
                          precision=_PRECISION.get(dtype, str(dtype)),
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


class _Bar:
    def __init__(self, total: int):
        from tqdm import tqdm

        self.tqdm = tqdm(total=total, unit="sample", desc="generating", leave=False)

    def update(self, done: int, total: int, seconds: float) -> None:
        self.tqdm.n = done
        self.tqdm.set_postfix_str(f"{done / seconds:.2f} samples/s" if seconds else "", refresh=False)
        self.tqdm.refresh()

    def close(self) -> None:
        self.tqdm.close()


def _progress_bar(total: int):
    return _Bar(total) if total else None


_ORDER = ["samples", "rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact", "triple_p", "triple_r", "triple_f1",
          "loss", "perplexity", "generation_seconds", "generated_tokens_per_s", "peak_memory_mb"]


def format_table(metrics: dict) -> str:
    rows = [(k, metrics[k]) for k in _ORDER if k in metrics]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows)
