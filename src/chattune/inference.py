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
from chattune.hardware import PRECISION_NAMES, placed_on
from chattune.models.checks import model_dtype
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
               revision: str | None = None, device: str | None = None, quantize: bool = True,
               placement_why: str | None = None) -> Tuned:
    """`device` (`cpu`, `cuda:N`: the commands take it from hardware.decide_device_and_dtype): where the weights are
    loaded (None: the CPU). `device_map="auto"` spreads a large model over the visible GPUs instead (accelerate's
    big-model loading). `quantize`: an adapter trained on a 4-/8-bit base (method=qlora, model.load_in_8bit) is
    loaded on one, as it was trained (`quantized_base`); False loads the unquantized base (export merges into it).
    `packed=True` (chat, serve: models that are only run) decodes the layers whose fp32 weights are exactly
    4-/8-bit blocks from those blocks (models/blockweights.py). `attn_implementation` (`model.attn_implementation`): the
    model's attention, e.g. eager or sdpa (default: transformers' choice). `revision` (`model.revision`): a hub
    base model's revision (default: the one the run trained on). `placement_why` (commands.placement): once loaded,
    the start-up line `device: D, dtype: T (why)` is logged, D and T as the loaded parameters say."""
    extra = _placement(device, device_map)
    if adapter:
        if check_adapter(adapter) == FULL_MODEL:
            adapter, model = None, adapter  # the output of a method that saves a full model: load it as one
    if adapter:
        folder = Path(adapter)
        info = read_info(folder)
        adapter_cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
        from chattune.methods.lora import refuse_unloadable

        refuse_unloadable(folder, adapter_cfg)  # a checkpoint of a lora.init=pissa_niter_N run
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
        if quantize:
            extra.update(quantized_base(folder, dtype, device or "cpu", device_map))
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
    if placement_why is not None:
        log(f"device: {placed_on(net)}, dtype: {PRECISION_NAMES.get(model_dtype(net), model_dtype(net))} "
            f"({placement_why})")
    if packed:
        from chattune.models.blockweights import enable

        enable(net, log)
    name = template or info.get("template") or "auto"
    tmpl = get_template(name, tokenizer, mtype, generation_stop_ids(net))
    return Tuned(net, tokenizer, tmpl, info, str(folder))


def recorded_hardware(folder: str | None) -> dict:
    """What a run recorded about where it trained: {"precision": its chattune.json's, "device": its run.json's}
    (a checkpoint-N's are its run's); {} for a plain model or a hub id."""
    from chattune.outputs import RUN_FILE, is_checkpoint

    if _is_bundled(folder):
        # Its weights are the GGUF's exact 8-bit blocks: fp32 holds them exactly and decodes from the blocks
        # (models/blockweights.py), about 2.5x the bf16 rate measured here; bf16 would round them.
        return {"precision": "fp32", "device": "cpu", "why": "the bundled model's weights are its GGUF's 8-bit "
                "blocks, exact in fp32, decoded from the blocks on a CPU"}
    if not folder or not Path(folder).is_dir():
        return {}
    found: dict = {"precision": read_info(folder).get("precision")}
    for run_file in [Path(folder) / RUN_FILE] + ([Path(folder).parent / RUN_FILE] if is_checkpoint(folder) else []):
        if run_file.is_file():
            try:
                found["device"] = json.loads(run_file.read_text(encoding="utf-8")).get("device")
            except ValueError:  # a broken run.json says nothing about the device; chattune.json still counts
                pass
            break
    return found


def _is_bundled(folder: str | None) -> bool:
    """No model named (the bundled one is the default), `bundled`, or its cache folder."""
    from chattune.models.bundled import bundled_model_dir

    if folder in (None, "", "bundled"):
        return True
    try:
        return Path(folder).resolve() == bundled_model_dir().resolve()
    except OSError:
        return False


def _placement(device: str | None, device_map: str | None) -> dict:
    """from_pretrained's placement: the weights go straight to the GPU (never a whole copy in CPU memory first)."""
    if device_map:
        return {"device_map": device_map}
    return {"device_map": {"": device}} if device and device != "cpu" else {}


def quantized_base(folder: Path, dtype: torch.dtype, device: str, device_map: str | None = None) -> dict:
    """from_pretrained's quantization arguments for an adapter trained on a 4-/8-bit base (method=qlora, or lora
    with model.load_in_8bit), built as training built them: the method's `load_kwargs` on the run's recorded
    config.yaml, so the BitsAndBytesConfig is the one the adapter was trained on (with the same compute dtype where
    `dtype` is the run's precision, as `--dtype auto` gives), placed on `device`. {} for any other adapter. A
    ModelError before anything loads where bitsandbytes cannot run: it needs a CUDA GPU."""
    from chattune.config import config_from_dict, recorded_config
    from chattune.methods import REGISTRY, get_method

    raw, _ = recorded_config(folder)
    method_name = raw.get("method") or read_info(folder).get("method")
    if method_name not in REGISTRY:
        return {}
    sections = {"model", *(m.section for m in REGISTRY.values() if m.section)}  # what the base's loading reads
    cfg = config_from_dict({"method": method_name, **{k: raw[k] for k in sections if k in raw}})
    method = get_method(cfg.method)
    bits = method.base_weight_bits(cfg)
    if not bits:
        return {}
    article = "an" if bits == 8 else "a"
    what = f"{folder} was trained on {article} {bits}-bit base (method={cfg.method}, bitsandbytes) and is loaded on one"
    fix = (f"fix: run it on a CUDA GPU with bitsandbytes (pip install 'chattune[qlora]'), or merge it into the "
           f"unquantized base with `chattune export --adapter {folder} --out DIR` and use --model DIR")
    if not device.startswith("cuda"):
        why = "this machine has no CUDA GPU" if not torch.cuda.is_available() else f"--device {device} was asked"
        raise ModelError(f"{what}, which needs a CUDA GPU: {why}; {fix}")
    if not bitsandbytes_installed():
        raise ModelError(f"{what}, which needs bitsandbytes: it is not installed; {fix}")
    kwargs = method.load_kwargs(cfg, dtype)
    kwargs["device_map"] = device_map or {"": device}  # training's is this process' GPU (LOCAL_RANK)
    return kwargs


def bitsandbytes_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


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
