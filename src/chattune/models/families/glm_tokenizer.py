"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat tokenizers as transformers fast tokenizers, without their code.

These models ship a remote-code `tokenization_chatglm.py` that no longer runs under current transformers (its
`_pad()` lacks `padding_side`). chattune never runs it: it reads the tokenizer's data files and builds a
`PreTrainedTokenizerFast` that gives the same ids.

- ChatGLM2/3: `tokenizer.model` is a SentencePiece BPE model (byte fallback, identity normalizer, dummy prefix,
  whitespace kept). The Python code appends special tokens after the SentencePiece vocab: `[MASK] [gMASK] [sMASK]
  sop eop`, and for ChatGLM3 also `<|system|> <|user|> <|assistant|> <|observation|>`. eos is `</s>`, pad `<unk>`.
  The protobuf is read here directly (a few lines of wire format), so neither `sentencepiece` nor `protobuf` is
  needed; merges come from the piece scores with transformers' `generate_merges`, as its Llama converter does.
- GLM-4: a tiktoken file (`tokenizer.model` in glm-4-9b-chat, `tokenizer.tiktoken` elsewhere: base64 token and
  rank per line) with GPT-4's split regex, converted with transformers' `TikTokenConverter`; the special tokens
  `<|endoftext|> ... <|end_of_video|>` follow the ranks (from id 151329 in the real vocab).

`encode(text)` of all three prepends `[gMASK]` and `sop` / `<sop>` (their `build_inputs_with_special_tokens`):
a TemplateProcessing post-processor does the same, so `add_special_tokens=True` gives the official ids and
`add_special_tokens=False` the bare ones.

One deliberate difference: the special tokens are matched in text here, so that a chat template rendered to text
(`apply_chat_template`, vLLM, chattune's exported `chat_template.jinja`) tokenizes to the right control tokens.
GLM-4's own tokenizer does the same; ChatGLM2/3's never match them (not even `</s>`), so for text that contains
a special-token string their ids equal `tokenizer(text, split_special_tokens=True)` here.

The converted tokenizer's `chat_template` is chattune's exact jinja for the family (chattune.data.template_files), and its
tokenizer_config.json records `chattune_glm_family` so that `template=auto` knows the family without config.json.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

from chattune.errors import ConfigError

CHATGLM2_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
CHATGLM3_SPECIALS = CHATGLM2_SPECIALS + ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>"]
PREFIX = {"chatglm2": ["[gMASK]", "sop"], "chatglm3": ["[gMASK]", "sop"], "glm4": ["[gMASK]", "<sop>"]}
KINDS = ("chatglm2", "chatglm3", "glm4")

# SentencePiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------- which tokenizer a folder holds


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_tiktoken(path: Path) -> bool:
    """A tiktoken file is text lines `base64 rank`; a SentencePiece model is a protobuf (starts with 0x0a)."""
    try:
        head = path.open("rb").read(200)
    except OSError:
        return False
    first = head.split(b"\n", 1)[0].split(b" ")
    return len(first) == 2 and first[1].strip().isdigit()


def vocab_file(folder: str | Path) -> Path | None:
    folder = Path(folder)
    for name in ("tokenizer.tiktoken", "tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    return None


def glm_tokenizer_kind(folder: str | Path) -> str | None:
    """"chatglm2" | "chatglm3" | "glm4" for a folder holding one of these remote-code tokenizers, else None.

    Evidence, read, never run: tokenizer_config.json's class / auto_map, the vocab file's format, and (ChatGLM2
    vs 3, which share the class name and the SentencePiece file) the role tokens in the shipped tokenizer code,
    the config's special tokens or chat template, or the model name."""
    folder = Path(folder)
    config = _json(folder / "tokenizer_config.json")
    auto = config.get("auto_map", {}).get("AutoTokenizer") if isinstance(config.get("auto_map"), dict) else None
    names = [config.get("tokenizer_class") or ""] + [a for a in (auto or []) if isinstance(a, str)]
    if not any("ChatGLM" in n for n in names):
        return None
    vocab = vocab_file(folder)
    if vocab is None:
        return None  # ChatGLM-6B (v1) ships ice_text.model: a different tokenizer
    if any("ChatGLM4" in n for n in names) or _is_tiktoken(vocab):
        return "glm4"
    text = json.dumps(config, ensure_ascii=False)
    code = folder / "tokenization_chatglm.py"
    code_text = code.read_text(encoding="utf-8", errors="replace") if code.is_file() else ""
    if "<|user|>" in code_text or "<|user|>" in text:
        return "chatglm3"
    if code_text and "[Round" in code_text:
        return "chatglm2"
    name = (text + json.dumps(_json(folder / "config.json"))).lower()
    if "chatglm3" in name:
        return "chatglm3"
    if "chatglm2" in name or "codegeex2" in name:
        return "chatglm2"
    return "chatglm3"  # the newer of the two, and the one whose tokens are a superset


# ---------------------------------------------------------------- SentencePiece model (protobuf) reading


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> dict[int, list]:
    """Protobuf wire format: field number -> values (ints for varints, bytes for length-delimited/fixed)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ConfigError(f"tokenizer.model: unsupported protobuf wire type {wire}; is it a SentencePiece model?")
        out.setdefault(number, []).append(value)
    return out


def _last(fields: dict[int, list], number: int, default):
    return fields[number][-1] if number in fields else default


def read_sentencepiece(path: str | Path) -> dict:
    """The parts of a SentencePiece ModelProto a fast tokenizer needs, with the proto2 defaults applied."""
    try:
        model = _fields(Path(path).read_bytes())
        pieces = []
        for raw in model.get(1, []):
            p = _fields(raw)
            score = struct.unpack("<f", _last(p, 2, b"\0\0\0\0"))[0]
            pieces.append((_last(p, 1, b"").decode("utf-8"), score, _last(p, 3, _NORMAL)))
        trainer = _fields(_last(model, 2, b""))
        normalizer = _fields(_last(model, 3, b""))
    except (IndexError, UnicodeDecodeError, struct.error) as e:
        raise ConfigError(f"{path}: not a readable SentencePiece model ({e})") from e
    return {
        "pieces": pieces,
        "model_type": _last(trainer, 3, 1),  # 1 unigram, 2 BPE
        "byte_fallback": bool(_last(trainer, 35, 0)),
        "unk_id": _last(trainer, 40, 0),
        "treat_whitespace_as_suffix": bool(_last(trainer, 24, 0)),
        "precompiled_charsmap": _last(normalizer, 2, b""),
        "add_dummy_prefix": bool(_last(normalizer, 3, 1)),
        "remove_extra_whitespaces": bool(_last(normalizer, 4, 1)),
        "escape_whitespaces": bool(_last(normalizer, 5, 1)),
    }


def _sentencepiece_tokenizer(spm: dict):
    """A tokenizers.Tokenizer doing what SentencePiece's BPE encoder does with this model."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    if spm["model_type"] != 2 or spm["treat_whitespace_as_suffix"]:
        raise ConfigError("tokenizer.model: chattune converts SentencePiece BPE models with the whitespace marker as "
                          "a prefix (ChatGLM2/3's); this one is not such a model")
    pieces = spm["pieces"]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    # Only normal pieces take part in merges: SentencePiece never builds control, byte or unused pieces from text.
    skip = [piece for piece, _, kind in pieces if kind != _NORMAL]
    scores = {piece: score for piece, score, kind in pieces if kind == _NORMAL}
    merges = generate_merges(vocab, scores, skip_tokens=skip)
    unk = pieces[spm["unk_id"]][0]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                        byte_fallback=spm["byte_fallback"], dropout=None))
    steps = []
    if spm["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(spm["precompiled_charsmap"]))
    if spm["remove_extra_whitespaces"]:  # leading, trailing and repeated spaces
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spm["add_dummy_prefix"]:
        steps.append(normalizers.Prepend("▁"))
    if spm["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    # No pre-tokenizer: SentencePiece merges over the whole text, the vocabulary alone keeps words apart.
    strip = [decoders.Strip(" ", 1, 0)] if spm["add_dummy_prefix"] else []  # drop the dummy prefix again
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    return tok


# ---------------------------------------------------------------- tiktoken (GLM-4)


def read_tiktoken(path: str | Path) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ConfigError(f"{path}:{n}: not a tiktoken line `base64 rank`") from e
    return ranks


def _tiktoken_tokenizer(path: Path):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):  # transformers' converter, reading the file without tiktoken
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return read_tiktoken(tiktoken_url)

    # The default pattern is GPT-4's split regex, the one GLM-4's tokenizer code uses.
    tok = _Converter(vocab_file=str(path)).converted()
    tok.post_processor = None  # replaced by the [gMASK] <sop> prefix below
    return tok, len(read_tiktoken(path))


# ---------------------------------------------------------------- the conversion


def _special_tokens(kind: str, folder: Path, first_id: int) -> list[tuple[int, str]]:
    """(id, token) of the tokens the Python code appends after the base vocab. GLM-4 lists them in
    tokenizer_config.json's added_tokens_decoder; ChatGLM2/3 have them hard-coded."""
    if kind == "glm4":
        listed = _json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
        found = sorted((int(i), t["content"]) for i, t in listed.items() if isinstance(t, dict) and "content" in t)
        if found:
            return found
        return [(first_id + i, t) for i, t in enumerate(GLM4_SPECIALS)]
    names = CHATGLM3_SPECIALS if kind == "chatglm3" else CHATGLM2_SPECIALS
    return [(first_id + i, t) for i, t in enumerate(names)]


def build_fast_tokenizer(folder: str | Path, kind: str | None = None):
    """The fast tokenizer for a ChatGLM2/3 or GLM-4 folder (no chat template yet; see convert_tokenizer)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    kind = kind or glm_tokenizer_kind(folder)
    if kind not in KINDS:
        raise ConfigError(f"{folder}: not a ChatGLM2/ChatGLM3/GLM-4 tokenizer folder (tokenizer_config.json with "
                          "ChatGLMTokenizer / ChatGLM4Tokenizer and tokenizer.model / tokenizer.tiktoken)")
    path = vocab_file(folder)
    if path is None:
        raise ConfigError(f"{folder}: no tokenizer.model or tokenizer.tiktoken")
    if kind == "glm4":
        tok, base = _tiktoken_tokenizer(path)
        eos, pad, unk = "<|endoftext|>", "<|endoftext|>", None
    else:
        spm = read_sentencepiece(path)
        tok, base = _sentencepiece_tokenizer(spm), len(spm["pieces"])
        eos, pad, unk = "</s>", "<unk>", spm["pieces"][spm["unk_id"]][0]
    specials = _special_tokens(kind, folder, base)
    _check_ids(tok, specials, base, folder)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for _, t in specials])
    if kind != "glm4":
        # </s> and <unk> are SentencePiece control pieces: special (skipped when decoding), matched in text
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (eos, unk)])
    prefix = PREFIX[kind]
    ids = {t: tok.token_to_id(t) for t in prefix}
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(prefix) + " $A", pair=" ".join(prefix) + f" $A $B {eos}",
        special_tokens=[(t, ids[t]) for t in prefix] + ([(eos, tok.token_to_id(eos))] if eos not in prefix else []))
    extra = [t for _, t in specials if t not in (eos, pad, unk)]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, unk_token=unk,
                                   additional_special_tokens=extra, padding_side="left",
                                   clean_up_tokenization_spaces=False, chattune_glm_family=kind)
    return fast, kind


def _check_ids(tok, specials: list[tuple[int, str]], base: int, folder: Path) -> None:
    """The special tokens must land on their official ids: right after the base vocab, in order, and none of them
    may already be a piece of it (tokenizers would reuse that piece's id)."""
    for offset, (tid, token) in enumerate(specials):
        if tid != base + offset or tok.token_to_id(token) is not None:
            raise ConfigError(f"{folder}: special token {token!r} (id {tid}) does not follow the base vocab of "
                              f"{base} entries; chattune cannot reproduce this tokenizer's ids")


def convert_tokenizer(folder: str | Path, out: str | Path):
    """Write `out`/tokenizer.json + tokenizer_config.json (eos/pad as the official ones, chat_template = chattune's
    exact template for the family) and return the loaded PreTrainedTokenizerFast."""

    from chattune.data.template_files import chat_template_jinja
    from chattune.data.templates import BUILTIN

    fast, kind = build_fast_tokenizer(folder)
    return save_tokenizer(fast, out, chat_template_jinja(BUILTIN[kind](), fast))


def save_tokenizer(fast, out: str | Path, chat_template: str | None = None):
    """Write a converted tokenizer into `out` (tokenizer.json, tokenizer_config.json with `chat_template`, and
    special_tokens_map.json, which transformers 5 no longer writes but older readers and serving tools look for)
    and return it loaded back from there."""
    from transformers import PreTrainedTokenizerFast

    if chat_template is not None:
        fast.chat_template = chat_template
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    special = {key: getattr(fast, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
               if getattr(fast, key, None) is not None}
    special["additional_special_tokens"] = [t for t in fast.all_special_tokens if t not in special.values()]
    (out / "special_tokens_map.json").write_text(json.dumps(special, ensure_ascii=False, indent=2) + "\n",
                                                 encoding="utf-8")
    return PreTrainedTokenizerFast.from_pretrained(str(out))
