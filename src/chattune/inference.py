"""Load any chattune output (or a plain model) for generation, with the template it was trained with.

Used by `chat`, `export` and later `eval` / `serve`, so every command loads a tuned model the same way:
- an adapter folder (LoRA, QLoRA, P-tuning v2): the base model named in its chattune.json / adapter_config.json,
  then `peft.PeftModel.from_pretrained`;
- a full-model folder (Freeze, full SFT, an export, any HF model): `AutoModelForCausalLM.from_pretrained`;
  given as `adapter=` it is loaded the same way, so any run's output_dir works as `--adapter`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from chattune.data.encode import encode_prompt
from chattune.data.formats import Conversation, Message
from chattune.data.templates import Template, get_template
from chattune.errors import ModelError
from chattune.models.load import generation_stop_ids, load_model, load_tokenizer, model_type, resolve_model_path
from chattune.outputs import ADAPTER_CONFIG, FULL_MODEL, NOT_A_MODEL, artefact_kind, read_info
from chattune.sampling import sampling_settings


@dataclass
class Tuned:
    model: torch.nn.Module
    tokenizer: object
    template: Template
    info: dict = field(default_factory=dict)  # chattune.json of the run, if any
    source: str = ""

    @property
    def stop_ids(self) -> list[int]:
        return self.template.stop_tokens(self.tokenizer)

    @property
    def pad_id(self) -> int:
        """What batched generation pads rows with: the tokenizer's pad token (models/load.py always sets one)."""
        return self.tokenizer.pad_token_id

    def prompt_ids(self, conv: Conversation) -> list[int]:
        return encode_prompt(conv, self.template, self.tokenizer)


def check_adapter(adapter: str) -> str:
    """The artefact kind of an `--adapter` folder; a clear error for a folder that holds no model (cheap: no load)."""
    kind = artefact_kind(adapter)
    if kind == NOT_A_MODEL:
        what = "no such folder" if not Path(adapter).is_dir() else \
            f"neither an adapter ({ADAPTER_CONFIG}) nor a model (config.json)"
        raise ModelError(f"--adapter {adapter}: {what}; point it at a chattune output_dir (or a checkpoint-N "
                         "folder inside it) that finished training")
    return kind


def load_tuned(adapter: str | None = None, model: str | None = None, template: str | None = None,
               trust_remote_code: bool | None = None, dtype: torch.dtype = torch.float32, log=print,
               device_map: str | None = None, packed: bool = False, attn_implementation: str | None = None,
               revision: str | None = None) -> Tuned:
    """`device_map="auto"` spreads a large model over the visible GPUs (accelerate's big-model loading).
    `packed=True` (chat, serve: models that are only run) decodes the layers whose fp32 weights are exactly
    4-/8-bit blocks from those blocks (models/blockweights.py). `attn_implementation` (`model.attn_implementation`): the
    model's attention, e.g. eager or sdpa (default: transformers' choice). `revision` (`model.revision`): a hub
    base model's revision (default: the one the run trained on)."""
    extra = {"device_map": device_map} if device_map else {}
    if adapter:
        if check_adapter(adapter) == FULL_MODEL:
            adapter, model = None, adapter  # the output of a method that saves a full model: load it as one
    if adapter:
        folder = Path(adapter)
        info = read_info(folder)
        adapter_cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
        base_spec = model or info.get("base_model") or adapter_cfg.get("base_model_name_or_path")
        if not base_spec:
            raise ModelError(f"{folder}: the adapter does not name its base model; give it with --model")
        if not model and info.get("model_spec") and not Path(base_spec).exists():
            base_spec = info["model_spec"]  # a cache folder (bundled, converted) that moved or was cleaned: remake it
        trust = info.get("trust_remote_code", False) if trust_remote_code is None else trust_remote_code
        revision = info.get("revision") if revision is None and not model else revision
        base_path = resolve_model_path(base_spec, log, revision)
        tok_source = folder if (folder / "tokenizer_config.json").exists() else Path(base_path)
        tokenizer = load_tokenizer(str(tok_source), trust, revision)
        base = load_model(base_path, dtype, trust, attn_implementation, revision, **extra)
        from peft import PeftModel

        net = PeftModel.from_pretrained(base, str(folder))
        mtype = model_type(base_path)
    else:
        spec = model or "bundled"
        path = resolve_model_path(spec, log, revision)
        info = read_info(path) if Path(path).is_dir() else {}
        trust = info.get("trust_remote_code", False) if trust_remote_code is None else trust_remote_code
        tokenizer = load_tokenizer(path, trust, revision)
        net = load_model(path, dtype, trust, attn_implementation, revision, **extra)
        mtype = model_type(path)
        folder = Path(path)
    net.eval()
    if packed:
        from chattune.models.blockweights import enable

        enable(net, log)
    name = template or info.get("template") or "auto"
    tmpl = get_template(name, tokenizer, mtype, generation_stop_ids(net))
    return Tuned(net, tokenizer, tmpl, info, str(folder))


def generate(tuned: Tuned, conv: Conversation, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, stream: bool = False) -> Iterator[str] | str:
    """Answer the last user turn of `conv`. With stream=True, yields text pieces as they are generated."""
    from transformers import TextIteratorStreamer

    ids = torch.tensor([tuned.prompt_ids(conv)], device=next(tuned.model.parameters()).device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  eos_token_id=tuned.stop_ids, pad_token_id=tuned.tokenizer.pad_token_id)
    settings = sampling_settings(getattr(tuned.model, "generation_config", None), temperature, top_p)
    kwargs.update(settings.generate_kwargs(), logits_processor=settings.answer_processors(ids.shape[1]))
    if not stream:
        with torch.no_grad():
            out = tuned.model.generate(**kwargs)
        return tuned.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    streamer = TextIteratorStreamer(tuned.tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run():
        try:
            with torch.no_grad():
                tuned.model.generate(**kwargs, streamer=streamer)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def pieces():
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]

    return pieces()


def conversation(history: list[Message], user: str, system: str | None = None) -> Conversation:
    return Conversation(history + [Message("user", user)], system=system)
