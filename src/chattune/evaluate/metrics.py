"""Scores of generated answers against references, computed the way the field's results are reported.

- `rouge-1`, `rouge-2`, `rouge-l` (F) and `bleu-4`, named and scaled as GLM-4's finetune demo reports them
  (finetune/finetune.py, `compute_metrics`): both texts cut into words by jieba; ROUGE from the `rouge-chinese`
  package on the space-joined words, per sample x100 rounded to 4 decimals; BLEU-4 from nltk's `sentence_bleu`
  with `SmoothingFunction().method3`, per sample on its own 0-1 scale (the demo does not scale it); each averaged
  over samples. So a chattune `bleu-4` of 0.2 sits beside a demo log's 0.2. An empty prediction or reference
  scores 0 (rouge-chinese raises on empty text; that is not a crash worth having).
- `exact`: 100 x the share of predictions equal to their reference after stripping surrounding white space.
- `triple_f1` (and `triple_p`, `triple_r`): ChatGLM-Finetuning's SPO extraction task. The answer lists triples
  `head_relation_tail`, one per line (the shared data's spo answers join them with newlines); a line that does
  not split into exactly three parts on `_` is not a triple and is dropped. Per sample P = |P∩G|/|P|,
  R = |P∩G|/|G| (0 where the set is empty), F1 from those; macro averages over every sample, x100.
"""

from __future__ import annotations

from typing import Callable

GENERATION_METRICS = ("rouge", "bleu", "exact", "triple_f1")
ALL_METRICS = (*GENERATION_METRICS, "loss")


def words(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(60)  # no "Building prefix dict" chatter
    return [w for w in jieba.cut(text)]


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F x100 for one sample, on jieba words, rounded to 4 decimals as GLM-4's demo does."""
    from rouge_chinese import Rouge

    pred, ref = " ".join(words(prediction.strip())), " ".join(words(reference.strip()))
    zero = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    if not pred.strip() or not ref.strip():
        return zero
    try:
        scores = Rouge().get_scores(pred, ref)[0]
    except (ValueError, RecursionError):  # e.g. only punctuation left after its own filtering
        return zero
    return {k: round(v["f"] * 100, 4) for k, v in scores.items()}


def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 (0-1, unscaled as GLM-4's demo reports it) with nltk's smoothing method 3, on jieba words."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    pred, ref = words(prediction.strip()), words(reference.strip())
    if not pred or not ref:
        return 0.0
    return sentence_bleu([ref], pred, smoothing_function=SmoothingFunction().method3)


def exact(prediction: str, reference: str) -> float:
    return 100.0 if prediction.strip() == reference.strip() else 0.0


def triples(text: str) -> set[tuple[str, str, str]]:
    found = set()
    for line in text.splitlines():
        parts = line.strip().split("_")
        if len(parts) == 3 and all(p.strip() for p in parts):
            found.add(tuple(p.strip() for p in parts))
    return found


def triple_prf(prediction: str, reference: str) -> tuple[float, float, float]:
    pred, gold = triples(prediction), triples(reference)
    hit = len(pred & gold)
    p = hit / len(pred) if pred else 0.0
    r = hit / len(gold) if gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


_COLUMNS = {"rouge": ["rouge-1", "rouge-2", "rouge-l"], "bleu": ["bleu-4"], "exact": ["exact"],
            "triple_f1": ["triple_p", "triple_r", "triple_f1"], "loss": ["loss", "perplexity"]}
LOWER_IS_BETTER = {"loss", "perplexity"}


def metric_columns(names) -> list[str]:
    """The result columns of the named metrics (`rouge` -> rouge-1, rouge-2, rouge-l)."""
    names = names.split(",") if isinstance(names, str) else names
    return [c for n in names for c in _COLUMNS.get(n.strip(), [])]


def per_sample(name: str) -> Callable[[str, str], dict[str, float]]:
    """The per-sample scorer of metric `name`: (prediction, reference) -> {column: value}."""
    if name == "rouge":
        return rouge_scores
    if name == "bleu":
        return lambda p, r: {"bleu-4": bleu4(p, r)}
    if name == "exact":
        return lambda p, r: {"exact": exact(p, r)}
    if name == "triple_f1":
        def score(p, r):
            tp, tr, tf = triple_prf(p, r)
            return {"triple_p": tp * 100, "triple_r": tr * 100, "triple_f1": tf * 100}
        return score
    raise ValueError(f"unknown metric {name!r}; choose from {', '.join(ALL_METRICS)}")


def compute_metrics(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean of each generation metric's columns over all samples (the `loss` metric is computed elsewhere)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in number")
    totals: dict[str, float] = {}
    for name in names:
        if name == "loss":
            continue
        scorer = per_sample(name)
        for p, r in zip(predictions, references):
            for key, value in scorer(p, r).items():
                totals[key] = totals.get(key, 0.0) + value
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


def parse_metric_names(text: str | list[str]) -> list[str]:
    from chattune.errors import ConfigError

    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in ALL_METRICS]
    if unknown or not names:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(ALL_METRICS)}")
    return list(dict.fromkeys(names))
