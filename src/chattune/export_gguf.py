"""`chattune export --format gguf --quant Q`: one GGUF file for llama.cpp (and Ollama), with a Modelfile beside it.

The file carries the weights, the tokenizer and the chat template chattune trained with, so llama.cpp prompts the
model exactly as `chattune chat` does. Input: a run (an adapter is merged first by `chattune.export.export`, the
same merge as `--format hf`), a full-model run, or a plain model folder (`--model`, `bundled` included).

Why the `gguf` package's writer and not llama.cpp's own `convert_hf_to_gguf.py`: that script ships in no wheel (only
in llama.cpp's sources and in the llama-cpp-python sdist, never in an installed package), it needs its own copy of
gguf-py, and it would load the model a second time its own way. chattune already depends on `gguf`, whose
`GGUFWriter` writes the file, whose `TensorNameMap` names each tensor the way llama.cpp looks it up, and whose
`gguf.quants` quantizes to Q8_0 / Q4_0 in numpy. What is written by hand below is what that script decides per
architecture, for the ones chattune covers (facts from llama.cpp's loader, checked end to end in
tests/test_export_gguf.py: llama.cpp's greedy tokens equal transformers' on the same weights):
- Llama layout (LlamaForCausalLM, e.g. the bundled SmolLM2; MistralForCausalLM): llama.cpp arch `llama`. It rotates
  adjacent pairs (x[2i], x[2i+1]) where transformers rotates the two halves of a head, so the rows of q_proj and
  k_proj are permuted per head (weights and biases). Llama 3's `llama3` rope scaling becomes the `rope_freqs`
  tensor (the per-frequency divisors), computed with transformers' own rope functions; `linear` becomes the
  rope.scaling keys.
- Qwen2ForCausalLM: arch `qwen2`, which rotates halves like transformers: no permutation; q/k/v biases kept.
- GlmForCausalLM (ChatGLM3 / GLM-4 checkpoints run through chattune's conversion, models/families/glm.py): arch
  `chatglm`, which rotates adjacent pairs of the first head_dim * partial_rotary_factor dimensions, as Glm does; the
  fused [gate | up] matrix is llama.cpp's `ffn_up` of twice the width, as is.
Other architectures are refused, naming them.

Precision (`--quant`): f32; f16 / bf16 for every matrix; q8_0 (blocks of 32: one fp16 scale, 32 int8); q4_0
(32 4-bit values and one scale) for every matrix except the output head (and the input embedding when it is tied
to it), which stays q8_0, because the head decides every token. Vectors (norms, biases) always stay f32, as in
llama.cpp's own files. A matrix whose rows are not a multiple of 32 cannot be blocked; it is written f16 (logged).

Tokenizer: byte-level BPE (`tokenizer.ggml.model` gpt2) with its vocab, merges, special-token ids and types. llama.cpp
splits text with one of its own pre-tokenizer regexes, named by `tokenizer.ggml.pre`; chattune names the one that
is the same as the tokenizer's own (`PRE_TOKENIZERS`) and refuses one it does not know, as it refuses SentencePiece
tokenizers (Llama 2, Mistral 7B, ChatGLM3): a wrong split would tokenize differently, silently.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from chattune.errors import ModelError
from chattune.outputs import ADAPTER, ADAPTER_CONFIG, FULL_MODEL, artefact_kind, atomic_folder, read_info

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
MODELFILE = "Modelfile"
BLOCK = 32  # Q8_0 and Q4_0 blocks hold 32 weights


def gguf_name(quant: str) -> str:
    return f"model-{quant}.gguf"


@dataclass(frozen=True)
class Arch:
    gguf_arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool  # llama.cpp rotates adjacent pairs where transformers rotates halves


ARCHS = {"llama": Arch("llama", True), "mistral": Arch("llama", True), "qwen2": Arch("qwen2", False),
         "glm": Arch("chatglm", False)}

# The tokenizer.json pre-tokenizers llama.cpp implements the same way, by `tokenizer.ggml.pre` name. The regexes are
# those of the tokenizer.json files (Qwen2, Llama 3 / GLM-4's GPT-4 split); llama.cpp spells them its own way.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
GPT4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_key(pre: dict | None) -> tuple:
    """A tokenizer.json pre_tokenizer as a comparable key (the fields that decide how text is split)."""
    if not isinstance(pre, dict):
        return ("none",)
    kind = pre.get("type")
    if kind == "ByteLevel":
        return ("bytelevel", bool(pre.get("use_regex", True)), bool(pre.get("add_prefix_space")))
    if kind == "Sequence":
        return ("sequence",) + tuple(_pre_key(p) for p in pre.get("pretokenizers") or [])
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        return ("split", pattern.get("Regex"), str(pre.get("behavior")).lower(), bool(pre.get("invert")))
    if kind == "Digits":
        return ("digits", bool(pre.get("individual_digits")))
    return (str(kind),)


_BYTES = ("bytelevel", False, False)
# (pre-tokenizer key, BPE ignore_merges) -> llama.cpp's name for the same split
PRE_TOKENIZERS = {
    (("bytelevel", True, False), False): "gpt-2",
    (("sequence", ("digits", True), ("bytelevel", True, False)), False): "smollm",
    (("sequence", ("split", QWEN2_SPLIT, "isolated", False), _BYTES), False): "qwen2",
    (("sequence", ("split", GPT4_SPLIT, "isolated", False), _BYTES), True): "llama-bpe",
    (("sequence", ("split", GPT4_SPLIT, "isolated", False), _BYTES), False): "chatglm-bpe",
}


# ------------------------------------------------------------------------------------------------ the command


def export_gguf(source: str | Path | None, out_dir: str | Path, quant: str = "f16", model: str | None = None,
                log=print) -> Path:
    """Write OUT/model-<quant>.gguf and OUT/Modelfile from a run (`source`, an `--adapter` folder) or a plain model
    (`model`: a folder, a hub id in the cache, or `bundled`). Returns the GGUF file's path."""
    from chattune.export import _check_out, _prompt_learning, export

    if quant not in QUANTS:
        raise ModelError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if (source is None) == (model is None):
        raise ModelError("export --format gguf: give either --adapter RUN (a chattune output folder) or --model "
                         "PATH (a plain model folder, or `bundled`), not both")
    out = Path(out_dir)
    _check_out(out)
    src = Path(source) if source is not None else None
    if src is not None:
        _check_run(src, _prompt_learning)
    with atomic_folder(out, "export") as tmp:
        if src is not None and artefact_kind(src) == ADAPTER:
            folder = tmp / ".merged"
            # The same merge as --format hf, kept in fp32 so that --quant rounds the merged weights only once.
            export(src, folder, log=log, dtype="fp32")
        elif src is not None:
            folder = src
        else:
            from chattune.models.load import resolve_model_path

            folder = _local_folder(resolve_model_path(model, log))
        path = tmp / gguf_name(quant)
        write_gguf(folder, path, quant, log)
        if folder.parent == tmp:
            shutil.rmtree(folder)
    log(f"exported {out / gguf_name(quant)} and {out / MODELFILE} (`ollama create NAME -f {out / MODELFILE}`)")
    return out / gguf_name(quant)


def _local_folder(spec: str) -> Path:
    """A model folder on disk: the folder itself, or a hub id's snapshot in the local Hugging Face cache."""
    if Path(spec).is_dir():
        return Path(spec)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: say how to get it
        raise ModelError(f"--model {spec}: not a local folder nor in the Hugging Face cache; download it first "
                         f"(`hf download {spec}`)") from None


def _check_run(src: Path, prompt_learning) -> None:
    """Refuse, before any merge, a run that cannot become a GGUF file: not a model, a prefix adapter, or (where its
    base model is a local folder) an architecture chattune does not write."""
    kind = artefact_kind(src)
    if kind not in (ADAPTER, FULL_MODEL):
        raise ModelError(f"--adapter {src}: neither an adapter (adapter_config.json) nor a model (config.json); "
                         "point it at a chattune output_dir or a checkpoint-N folder in it")
    model_folder = src
    if kind == ADAPTER:
        adapter = json.loads((src / ADAPTER_CONFIG).read_text())
        if prompt_learning(adapter):
            raise ModelError(f"--adapter {src} is a P-tuning v2 (prefix) adapter: its prefix adds key/value "
                             "positions to every layer instead of changing weights, so no GGUF file can hold it; "
                             "export a LoRA, Freeze or full fine-tuning run instead")
        model_folder = Path(read_info(src).get("base_model") or adapter.get("base_model_name_or_path") or "")
    if (model_folder / "config.json").is_file():
        from transformers import AutoConfig

        _arch(AutoConfig.from_pretrained(model_folder))


def write_gguf(folder: Path, path: Path, quant: str, log=print) -> None:
    """The GGUF file of a plain model folder (config.json, safetensors, tokenizer) with its chattune template."""
    import gguf
    from transformers import AutoConfig

    from chattune.export_ollama import write_modelfile

    config = AutoConfig.from_pretrained(folder)
    arch = _arch(config)
    tokenizer, template = _tokenizer_and_template(folder)
    tensors = plan_tensors(folder, config, arch, quant, log)
    writer = gguf.GGUFWriter(path, arch.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.resolve().name)
    write_hparams(writer, config, arch, quant, log)
    write_tokenizer(writer, tokenizer, template, config, arch, log)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    size = sum(t.nbytes for t in tensors) / 2**20
    log(f"writing {path.name}: {arch.gguf_arch} architecture, {len(tensors)} tensors, {size:.0f} MiB ({quant}), "
        f"template {template.name} ...")
    try:  # header, metadata, tensor table, then the data one tensor at a time (never the whole model in memory)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(t.data())
    finally:
        writer.close()
    write_modelfile(path.parent, path.name, template, tokenizer, log)


def _arch(config) -> Arch:
    mtype = getattr(config, "model_type", None)
    if mtype not in ARCHS:
        names = ", ".join(getattr(config, "architectures", None) or [str(mtype)])
        raise ModelError(f"export --format gguf: the architecture {names} (model_type {mtype}) is not one chattune "
                         "writes as GGUF; covered: Llama-layout (llama, mistral), qwen2 and the GLM family "
                         "(ChatGLM3 / GLM-4, model_type glm); use --format hf and llama.cpp's convert_hf_to_gguf.py")
    return ARCHS[mtype]


def _tokenizer_and_template(folder: Path):
    """The tokenizer and the template chattune trains and chats with for this folder (its chattune.json's
    `template`, else `auto`), exactly as `load_tuned` picks it, without loading the weights."""
    from transformers import GenerationConfig

    from chattune.data.templates import get_template
    from chattune.models.load import generation_stop_ids, load_tokenizer, model_type

    info = read_info(folder)
    tokenizer = load_tokenizer(str(folder), info.get("trust_remote_code", False))
    try:
        generation = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError):
        generation = None
    stops = generation_stop_ids(SimpleNamespace(generation_config=generation))
    return tokenizer, get_template(info.get("template") or "auto", tokenizer, model_type(str(folder)), stops)


# ------------------------------------------------------------------------------------------------ hyperparameters


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if not params:  # a config written before transformers 5
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hparams(writer, config, arch: Arch, quant: str, log) -> None:
    import gguf

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    dim = head_dim(config)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = _rope(config)
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(dim * partial))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3"):  # llama3: the rope_freqs tensor (plan_tensors)
        raise ModelError(f"config.json: rope type {kind!r} is not one chattune writes as GGUF (default, linear, "
                         "llama3); use --format hf and llama.cpp's convert_hf_to_gguf.py")
    if kind == "llama3" and arch.gguf_arch != "llama":
        raise ModelError(f"config.json: rope type llama3 on a {config.model_type} model is not supported")
    window = getattr(config, "sliding_window", None)
    if window and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False)) \
            and window < config.max_position_embeddings:
        log(f"note: the model's sliding attention window ({window} tokens) has no GGUF key for this architecture: "
            f"llama.cpp attends to the whole context, which gives the same answers up to {window} tokens")
    writer.add_file_type(FILE_TYPES[quant]())
    if quant in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _file_type(name: str):
    import gguf

    return lambda: getattr(gguf.LlamaFileType, name)


FILE_TYPES = {"f32": _file_type("ALL_F32"), "f16": _file_type("MOSTLY_F16"), "bf16": _file_type("MOSTLY_BF16"),
              "q8_0": _file_type("MOSTLY_Q8_0"), "q4_0": _file_type("MOSTLY_Q4_0")}


# ------------------------------------------------------------------------------------------------ tensors


@dataclass
class Tensor:
    name: str  # the GGUF name
    shape: tuple[int, ...]  # numpy order (rows, columns)
    qtype: object  # gguf.GGMLQuantizationType
    load: object  # () -> float32 numpy array in `shape`

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * size

    def data(self) -> np.ndarray:
        import gguf

        out = gguf.quants.quantize(self.load(), self.qtype)
        assert out.nbytes == self.nbytes, (self.name, out.nbytes, self.nbytes)
        return out


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} holds no safetensors weights (GGUF export reads safetensors only); load the model "
                         "and save it with `save_pretrained(folder, safe_serialization=True)` first")
    return files


def plan_tensors(folder: Path, config, arch: Arch, quant: str, log) -> list[Tensor]:
    """Every weight of the folder as a GGUF tensor: its name, shape, type and how to read and transform it."""
    import gguf
    from safetensors import safe_open

    if getattr(config, "quantization_config", None):
        raise ModelError("config.json: the model's weights are quantized (quantization_config); export the "
                         "unquantized model (a QLoRA run is merged into its unquantized base automatically)")
    if getattr(config, "mlp_bias", False):
        raise ModelError("config.json: mlp_bias=true (biases on the MLP) is not in llama.cpp's llama architecture")
    names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.gguf_arch.upper()], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out, fallback = [], []
    for file in _weight_files(folder):
        with safe_open(file, "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        for key, shape in shapes.items():
            if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                continue  # a buffer the model recomputes / the tied head, which llama.cpp takes from token_embd
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ModelError(f"{file.name}: tensor {key} has no place in llama.cpp's {arch.gguf_arch} "
                                 "architecture; this model cannot be exported as GGUF by chattune")
            qtype, blocked_out = tensor_type(name, shape, quant, tied)
            if blocked_out:
                fallback.append(name)
            out.append(Tensor(name, shape, qtype, _loader(file, key, _permutation(key, config, arch))))
    if fallback:
        log(f"note: {len(fallback)} matrices have rows that are not a multiple of {BLOCK} and are written f16: "
            + ", ".join(fallback[:5]) + (" ..." if len(fallback) > 5 else ""))
    if _rope(config)["rope_type"] == "llama3":
        factors = llama3_rope_factors(config)
        out.append(Tensor("rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32, lambda: factors))
    return out


def tensor_type(name: str, shape: tuple, quant: str, tied: bool):
    """(the GGML type a tensor is written in, whether a blocked type was wanted but its rows do not split into
    blocks of 32, so it is f16 instead). Vectors stay f32; with q4_0 the output head stays q8_0."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or quant == "f32":
        return q.F32, False
    head = name.startswith("output.") or (tied and name.startswith("token_embd."))
    wanted = {"f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q8_0 if head else q.Q4_0}[quant]
    if wanted in (q.Q8_0, q.Q4_0) and shape[-1] % BLOCK:
        return q.F16, True
    return wanted, False


def _permutation(key: str, config, arch: Arch) -> int | None:
    """The number of heads whose rows a q_proj / k_proj tensor is permuted by (llama arch), else None."""
    if not arch.permute_qk:
        return None
    if ".q_proj." in key:
        return config.num_attention_heads
    if ".k_proj." in key:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from transformers' layout (first half of the head, then the second half, rotated together)
    to llama.cpp's (rotated pairs adjacent): row i of the first half and row i of the second half end up side by
    side. Works on a weight [heads * head_dim, in] and on a bias [heads * head_dim]."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _loader(file: Path, key: str, heads: int | None):
    def load() -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            w = f.get_tensor(key).to(torch.float32).numpy()
        return permute_rows(w, heads) if heads else w

    return load


def llama3_rope_factors(config) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3 rope scaling: per frequency, how much slower it turns than the plain
    rope's (default inverse frequency / scaled inverse frequency), from transformers' own rope functions."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    dim = head_dim(config)
    base = float(_rope(config)["rope_theta"])
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled).to(torch.float32).numpy()


# ------------------------------------------------------------------------------------------------ tokenizer


def write_tokenizer(writer, tokenizer, template, config, arch: Arch, log=print) -> None:
    """tokenizer.ggml.* (gpt2 BPE) and tokenizer.chat_template from chattune's tokenizer and template."""
    from chattune.data.template_files import chat_template_jinja

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = llama_cpp_pre(spec, arch)
    tokens, types = token_table(spec, _embedding_rows(config, tokenizer))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not merges:
        raise ModelError("tokenizer.json: a BPE tokenizer without merges cannot be written as GGUF (llama.cpp "
                         "requires tokenizer.ggml.merges)")
    writer.add_token_merges(merges)
    for add, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{add}_token_id")(value)
    for add, value in zip(("eot", "eom"), _extra_stops(template, tokenizer, log)):
        getattr(writer, f"add_{add}_token_id")(value)
    jinja = chat_template_jinja(template, tokenizer)
    adds_bos, adds_eos = _added_specials(tokenizer)
    # The chat template writes the prompt's leading special tokens itself (`<|begin_of_text|>`, `[gMASK]<sop>`):
    # llama.cpp must then not add a bos of its own, or the prompt would differ from chattune's.
    writer.add_add_bos_token(adds_bos and not _template_writes_bos(template, tokenizer))
    writer.add_add_eos_token(adds_eos)
    writer.add_chat_template(jinja)


def llama_cpp_pre(spec: dict, arch: Arch) -> str:
    model = spec.get("model") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise ModelError("export --format gguf: the tokenizer is not byte-level BPE (GPT-2 style: Qwen2, Llama 3, "
                         "GLM-4, SmolLM); SentencePiece-style tokenizers (Llama 2, Mistral 7B, ChatGLM3) are not "
                         "written by chattune; use --format hf and llama.cpp's convert_hf_to_gguf.py")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # NFC: llama.cpp leaves text as is, the same for NFC text
        raise ModelError(f"tokenizer.json: normalizer {normalizer} has no llama.cpp counterpart chattune knows")
    key = (_pre_key(spec.get("pre_tokenizer")), bool(model.get("ignore_merges")))
    pre = PRE_TOKENIZERS.get(key)
    if pre is None:
        raise ModelError(f"tokenizer.json: pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:300]} (ignore_merges="
                         f"{key[1]}) is not one whose llama.cpp counterpart chattune knows (those of GPT-2, SmolLM, "
                         "Qwen2, Llama 3, GLM-4): llama.cpp would split text differently")
    return "glm4" if pre == "llama-bpe" and arch.gguf_arch == "chatglm" else pre


def _embedding_rows(config, tokenizer) -> int:
    rows = getattr(config, "vocab_size", None) or len(tokenizer)
    if len(tokenizer) > rows:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but the embedding matrix {rows} rows")
    return rows


def token_table(spec: dict, rows: int) -> tuple[list[str], list[int]]:
    """The token text and llama.cpp token type of every embedding row: vocab tokens NORMAL, added special tokens
    CONTROL (matched in text only where special tokens are parsed), other added tokens USER_DEFINED (always
    matched), rows no token uses `[PAD<id>]` UNUSED."""
    import gguf

    tokens: list[str | None] = [None] * rows
    types = [int(gguf.TokenType.UNUSED)] * rows
    for text, i in spec["model"]["vocab"].items():
        if i < rows:
            tokens[i], types[i] = text, int(gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens") or []:
        i = added["id"]
        if i < rows:
            kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
            tokens[i], types[i] = added["content"], int(kind)
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types


# Token texts llama.cpp ends generation at by itself (llama-vocab.cpp, the end-of-generation list).
_LLAMA_CPP_STOPS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>",
                    "<EOT>", "<|end_of_text|>"}


def _extra_stops(template, tokenizer, log=print) -> list[int]:
    """The template's stop tokens that llama.cpp would not stop at by itself (not eos, not a text it knows), for its
    eot / eom ids: it ends generation at eos, eot and eom."""
    extra = [i for i in template.stop_tokens(tokenizer)
             if i != tokenizer.eos_token_id and tokenizer.convert_ids_to_tokens(i) not in _LLAMA_CPP_STOPS]
    if len(extra) > 2:
        names = ", ".join(tokenizer.convert_ids_to_tokens(i) for i in extra[2:])
        log(f"note: llama.cpp has room for two extra stop tokens; it will not stop at {names} by itself "
            "(the Modelfile's PARAMETER stop lines name them for Ollama)")
    return extra[:2]


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """Whether encoding text adds bos in front / eos at the end (the tokenizer's post-processor)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and len(full) > len(plain) and full[0] == bos and plain[:1] != [bos]
    adds_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and plain[-1:] != [eos]
    return adds_bos, adds_eos


def _template_writes_bos(template, tokenizer) -> bool:
    from chattune.data.template_files import chat_template_jinja

    if tokenizer.bos_token is None:
        return False
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False,
                                         add_generation_prompt=True,
                                         chat_template=chat_template_jinja(template, tokenizer))
    return text.startswith(tokenizer.bos_token)
