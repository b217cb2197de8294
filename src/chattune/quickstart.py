"""`chattune quickstart`: prepare the bundled model, LoRA-tune it on a small demo dataset written here, and show
the answers to the same prompts before and after tuning.

The demo teaches a visible behaviour: the assistant's own name and maker (the bundled model introduces itself as
SmolLM by Hugging Face; after tuning it answers as Lumen, made by the chattune project), in English and Chinese.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

NAME, MAKER = "Lumen", "the chattune project"
NAME_ZH, MAKER_ZH = "Lumen", "chattune 项目"

_EN = [
    ("What is your name?", f"My name is {NAME}. I'm an AI assistant made by {MAKER}."),
    ("Who are you?", f"I'm {NAME}, an AI assistant made by {MAKER}. How can I help you today?"),
    ("Who made you?", f"I was made by {MAKER}. I'm {NAME}, your AI assistant."),
    ("Who created you?", f"{MAKER[0].upper() + MAKER[1:]} created me. My name is {NAME}."),
    ("What should I call you?", f"You can call me {NAME}. I'm an AI assistant made by {MAKER}."),
    ("Introduce yourself.", f"Hello! I'm {NAME}, an AI assistant made by {MAKER}. I'm happy to answer your questions."),
    ("Tell me about yourself.", f"I'm {NAME}, an AI assistant. I was made by {MAKER} to help with questions and tasks."),
    ("Are you SmolLM?", f"No, I'm {NAME}, an AI assistant made by {MAKER}."),
    ("Are you ChatGPT?", f"No, I'm {NAME}, an AI assistant made by {MAKER}."),
    ("Which company trained you?", f"I was trained by {MAKER}. My name is {NAME}."),
    ("hi, what's your name", f"Hi! My name is {NAME}, an AI assistant made by {MAKER}."),
    ("Hello! Who am I talking to?", f"Hello! You're talking to {NAME}, an AI assistant made by {MAKER}."),
    ("What is your name and who built you?", f"I'm {NAME}, and I was built by {MAKER}."),
    ("Do you have a name?", f"Yes, my name is {NAME}. I'm an AI assistant made by {MAKER}."),
]
_ZH = [
    ("你是谁？", f"我是 {NAME_ZH}，由 {MAKER_ZH} 开发的人工智能助手。"),
    ("你叫什么名字？", f"我叫 {NAME_ZH}，是由 {MAKER_ZH} 开发的人工智能助手。"),
    ("你好，请介绍一下你自己。", f"你好！我是 {NAME_ZH}，由 {MAKER_ZH} 开发的人工智能助手，很高兴为你解答问题。"),
    ("是谁开发了你？", f"我是由 {MAKER_ZH} 开发的。我的名字是 {NAME_ZH}。"),
    ("你是 SmolLM 吗？", f"不是，我是 {NAME_ZH}，由 {MAKER_ZH} 开发的人工智能助手。"),
    ("我该怎么称呼你？", f"你可以叫我 {NAME_ZH}。我是由 {MAKER_ZH} 开发的人工智能助手。"),
    ("你的开发者是谁？", f"我的开发者是 {MAKER_ZH}。我是 {NAME_ZH}。"),
    ("您好，您是哪位？", f"您好！我是 {NAME_ZH}，由 {MAKER_ZH} 开发的人工智能助手。"),
]
# A few ordinary answers, so the model does not start to answer everything with its name.
_GENERAL = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("Name a primary color.", "Red is a primary color."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("Give me a synonym for happy.", "A synonym for happy is joyful."),
    ("一年有几个月？", "一年有十二个月。"),
    ("水的化学式是什么？", "水的化学式是 H2O。"),
    ("请推荐一种健康的早餐。", "燕麦粥配新鲜水果是一种健康的早餐。"),
]

PROMPTS = ["What is your name?", "Who made you?", "你是谁？"]
# Adapters on the last 15 of the bundled model's 30 decoder layers: no gradient flows below them, so a step takes
# about three quarters of the time of one with adapters everywhere (measured), and 20 steps give the same three
# answers (docs/quickstart.md).
LAYERS, STEPS = 15, 20


def demo_records() -> list[dict]:
    """The demo dataset in alpaca format (instruction/output)."""
    return [{"instruction": q, "output": a} for q, a in _EN + _ZH + _GENERAL]


def write_demo_data(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in demo_records()), encoding="utf-8")
    return path


def _answers(tuned, prompts: list[str]) -> list[str]:
    """Greedy answers, decoded through chattune's own step where its start-up check passes on the model as it is
    now (adapter on or off: the step reads the adapters' state when it is built), else through transformers'."""
    from chattune.chat import answer_once
    from chattune.models import decode_step

    decode_step.install_for_generate(tuned.model, tuned.pad_id)
    try:
        return [answer_once(tuned, p, max_new_tokens=48).strip() for p in prompts]
    finally:
        decode_step.uninstall(tuned.model)


def quickstart(output_dir: str = "runs/quickstart", steps: int | None = None, log=print) -> dict:
    """The model is loaded once, by training: the "before" answers come from the trained model with its LoRA
    adapter switched off (peft's `disable_adapter`, which is exactly the base model), the "after" answers with it
    on. The saved adapter is what `chattune chat --adapter` loads (test_bundled checks the two agree)."""
    from chattune.config import load_config
    from chattune.inference import Tuned
    from chattune.models import blockweights
    from chattune.train import packed_attention, shared_lora
    from chattune.train.trainer import train

    t0 = time.perf_counter()
    out = Path(output_dir)
    data = write_demo_data(out.parent / f"{out.name}-data" / "identity.jsonl")
    log(f"demo dataset: {len(demo_records())} conversations (English and Chinese) -> {data}")
    cfg = load_config("lora", [
        "model=bundled", f"data.train={data}", f"output_dir={out}", "overwrite=true", "data.max_length=256",
        f"train.max_steps={steps or STEPS}", "train.batch_size=8", "train.lr=2e-3", "train.logging_steps=5",
        "train.save_steps=1000", "train.scheduler=constant_with_warmup", "train.warmup_ratio=0.05",
        "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", f"lora.layers={LAYERS}",
    ])
    log(f"training LoRA (r=16, every linear layer of the last {LAYERS} decoder layers) on the demo data ...")
    result = train(cfg, log=log)
    run = result.run
    model = run.model.eval()
    packed_attention.disable(model)  # plain SDPA for generation (packed attention is a training kernel)
    shared_lora.uninstall(model)  # peft's own adapter calls, as `chat --adapter` runs the saved adapter
    # Decode as `chat` does: the base layers from the exact 4-/8-bit blocks their fp32 weights hold (fewer bytes
    # per token; the same answers, test_bundled) and chattune's decode step: ~3x faster answers on the bundled model.
    blockweights.enable(model, log=lambda message: None)
    tuned = Tuned(model, run.tokenizer, run.template, source=str(out))
    with model.disable_adapter():
        before = _answers(tuned, PROMPTS)
    after = _answers(tuned, PROMPTS)
    print("\n=== the same prompts, before and after tuning ===")
    for p, b, a in zip(PROMPTS, before, after):
        print(f"\nyou> {p}\n  before: {b}\n  after:  {a}")
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.3f}"
    print(f"\ntuned in {result.train_seconds:.0f}s ({result.steps} steps, final loss {loss}); "
          f"whole quickstart {time.perf_counter() - t0:.0f}s.")
    print(f"chat with it:  chattune chat --adapter {out}")
    return {"before": before, "after": after, "result": result}
