"""ChatGLM-6B's (GLM v1, THUDM/chatglm-6b) tokenizer as a transformers fast tokenizer, without its code.

What: `build_fast_tokenizer(folder)` reads the published `ice_text.model` (a SentencePiece ModelProto) and
`tokenizer_config.json` and builds a `PreTrainedTokenizerFast` whose ids are those of the publisher's remote-code
`ChatGLMTokenizer`; `convert_tokenizer(folder, out)` writes it as tokenizer.json + tokenizer_config.json.

Why: that code (`tokenization_chatglm.py`, written for transformers 4.2x) needs `sentencepiece` and does not run
under transformers 5. chattune never runs it: the protobuf is read by hand (glm_tokenizer.read_sentencepiece), so
neither `sentencepiece` nor `protobuf` is needed.

Facts it reproduces, from that code (THUDM/chatglm-6b, last tokenizer change "Update decode method in tokenizer"):

- Before SentencePiece sees the text, `\\n` becomes `<n>`, a tab `<|tab|>` and each run of 2..80 spaces
  `<|blank_N|>` (replaced longest first: 85 spaces are `<|blank_80|><|blank_5|>`, 81 are `<|blank_80|>` and one
  space). Only then does SentencePiece normalize (the model's charsmap: NFKC, so "，" is ","), drop leading,
  trailing and repeated spaces (remove_extra_whitespaces) and add the dummy prefix "▁".
- ids = SentencePiece id + `num_image_tokens` (tokenizer_config.json; 0 in the current release whose config.json
  says vocab_size 130528; the code's default, 20000, when the key is absent, as in the first release with
  vocab_size 150528). Ids below it are `<image_N>` tokens; SentencePiece never produces them.
- `ice_text.model` is icetk's text model (130000 pieces: `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3, `<n>` 4, "▁" 5, ...)
  with what GLM-130B's tokenizer appends: `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>` as control
  pieces (130000..130007), `<|tab|>` and `<|blank_2..80|>` as user-defined pieces (130008..130087) and 256 byte pieces
  (130088..130343), byte_fallback on: 130344 pieces (the model's embedding has 130528 rows). Its model type is read
  from the file (the real one is a unigram model); unigram and BPE are both converted.
- `encode(text)` appends `[gMASK] <sop>` after the text; a pair is `a [gMASK] <sop> b <eop>`
  (`build_inputs_with_special_tokens`, used by ptuning/main.py). bos `<sop>`, eos `<eop>`, pad `<pad>` (id 3),
  unk `<unk>`, mask `[MASK]`, padding on the left.
- Special-token strings in text: under transformers 4.27 the code matches only the five tokens it registers
  (`<sop> <eop> <unk> <pad> [MASK]`), eating the whitespace on both sides and giving each remaining piece of text
  its own dummy prefix; `[gMASK]`, `</s>` and the other control pieces are plain text there (SentencePiece never
  produces a control piece). Here every control piece is matched (so a chat template rendered to text, with
  `[gMASK]<sop>` in it, gives the control ids), the five with the same whitespace stripping; so the official ids
  for text holding other control-token strings are `tokenizer(text, split_special_tokens=True)`.
- Decoding is SentencePiece's (pieces joined, "▁" as space, the dummy prefix dropped: with remove_extra_whitespaces
  every leading space of the text) and then `<n>`, `<|tab|>`, `<|blank_N|>` back to whitespace, then transformers'
  `clean_up_tokenization` (" ." -> "." etc.), which the official `decode` (4.27: clean_up_tokenization_spaces
  True) and so ChatGLM-6B's `chat()` apply.

The unigram model is SentencePiece's lattice, made exact here: user-defined pieces are in the vocab with the score
SentencePiece gives them in its lattice (`len(bytes) * max(FLT_MIN, best normal score) - 0.1`), control, unknown,
byte and image pieces get a score so low that they are never chosen from text (SentencePiece keeps them out of its
trie). Differences that remain: `decode(ids, skip_special_tokens=False)` shows control tokens (`[gMASK]`...) and
`<unk>`, where SentencePiece prints nothing and " ⁇ "; and an unknown character between pieces is priced from the
lowest score in the vocab (SentencePiece: the lowest normal score), which only matters for a character that has no
piece of its own but starts a longer piece (SentencePiece's trainer never makes such a vocab). A BPE model merges
with all splits of every normal piece (transformers' generate_merges, as its Llama converter), the user-defined
pieces split off first as SentencePiece does (a pre-tokenizer: as added tokens they would be normalized, dummy
prefix included); a stretch of text between them that is itself a piece is taken whole (ignore_merges), where
SentencePiece could in principle get stuck on two pieces that do not concatenate to a third.

The tokenizer_config.json records `chattune_glm_family: "chatglm6b"`, as glm_tokenizer does for ChatGLM2/3/GLM-4.
"""

from __future__ import annotations

import struct
from pathlib import Path

from chattune.errors import ConfigError
from chattune.models.families.glm_tokenizer import (_CONTROL, _NORMAL, _UNKNOWN, _USER_DEFINED, _json,
                                                    read_sentencepiece, save_tokenizer)

VOCAB_FILE = "ice_text.model"
FAMILY = "chatglm6b"
# SPTokenizer.special_tokens: control pieces of ice_text.model, in this order
SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
MAX_BLANK = 80
TAB = "<|tab|>"
NEWLINE = "<n>"
DEFAULT_IMAGE_TOKENS = 20000  # ChatGLMTokenizer(num_image_tokens=20000) when tokenizer_config.json has no value
# the names ChatGLMTokenizer takes from tokenizer_config.json, with its defaults
NAMES = {"bos_token": "<sop>", "eos_token": "<eop>", "unk_token": "<unk>", "pad_token": "<pad>",
         "mask_token": "[MASK]", "gmask_token": "[gMASK]"}
# config.json id fields -> the token whose id they must be
CONFIG_IDS = {"bos_token_id": "bos_token", "eos_token_id": "eos_token", "mask_token_id": "mask_token",
              "gmask_token_id": "gmask_token", "pad_token_id": "pad_token"}
_FLT_MIN = struct.unpack("<f", struct.pack("<I", 0x00800000))[0]  # C's FLT_MIN, SentencePiece's max_score_ start
_NEVER = -1e9  # score of pieces SentencePiece never produces from text


def _class_names(config: dict) -> list[str]:
    auto = config.get("auto_map", {}).get("AutoTokenizer") if isinstance(config.get("auto_map"), dict) else None
    auto = [auto] if isinstance(auto, str) else auto
    return [config.get("tokenizer_class") or ""] + [a for a in (auto or []) if isinstance(a, str)]


def is_chatglm6b_tokenizer(folder: str | Path) -> bool:
    """True for a ChatGLM-6B (v1) tokenizer folder: ice_text.model and a tokenizer_config.json naming
    ChatGLMTokenizer. ChatGLM2/3 use the same class name but ship tokenizer.model (glm_tokenizer.py)."""
    folder = Path(folder)
    if not (folder / VOCAB_FILE).is_file():
        return False
    return any(n == "ChatGLMTokenizer" or n.endswith(".ChatGLMTokenizer")
               for n in _class_names(_json(folder / "tokenizer_config.json")))


def _name(config: dict, key: str) -> str:
    value = config.get(key, NAMES[key])
    if isinstance(value, dict):  # an AddedToken as transformers saves it
        value = value.get("content", NAMES[key])
    return value if isinstance(value, str) and value else NAMES[key]


def _read_model(folder: Path) -> dict:
    path = folder / VOCAB_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: no {VOCAB_FILE}. ChatGLM-6B's tokenizer is {VOCAB_FILE} (a SentencePiece "
                          "model, a git-lfs file in THUDM/chatglm-6b) with tokenizer_config.json; put the published "
                          f"{VOCAB_FILE} into {folder}")
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise ConfigError(f"{path} is a git-lfs pointer, not the model: fetch the file itself "
                          "(`git lfs pull` in the model repository, or download it from the hub)")
    try:
        spm = read_sentencepiece(path)
    except ConfigError as e:  # its wire-format message names tokenizer.model
        raise ConfigError(f"{path}: not a readable SentencePiece model ({e})") from e
    if not spm["pieces"]:
        raise ConfigError(f"{path}: no pieces; is it a SentencePiece model?")
    if spm["model_type"] not in (1, 2):
        raise ConfigError(f"{path}: SentencePiece model type {spm['model_type']} (1 is unigram, 2 BPE); chattune "
                          "converts unigram and BPE models only")
    if spm["treat_whitespace_as_suffix"]:
        raise ConfigError(f"{path}: treat_whitespace_as_suffix is set; ChatGLM-6B's model puts the whitespace "
                          "marker before a word and chattune converts only that layout")
    return spm


def _layout(folder: Path, spm: dict) -> dict:
    """Everything the conversion needs from tokenizer_config.json and config.json, checked against the model."""
    config = _json(folder / "tokenizer_config.json")
    for key in ("remove_space", "do_lower_case"):
        if config.get(key):
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: {key} is true; ChatGLM-6B publishes it false "
                              "and chattune reproduces only that; set it to false")
    images = config.get("num_image_tokens", DEFAULT_IMAGE_TOKENS)
    if not isinstance(images, int) or isinstance(images, bool) or images < 0:
        raise ConfigError(f"{folder / 'tokenizer_config.json'}: num_image_tokens must be a whole number >= 0, "
                          f"not {images!r}")
    names = {key: _name(config, key) for key in NAMES}
    index = {piece: i for i, (piece, _, _) in enumerate(spm["pieces"])}
    kinds = {piece: kind for piece, _, kind in spm["pieces"]}
    path = folder / VOCAB_FILE
    for token in list(dict.fromkeys(SPECIALS + list(names.values()))):
        if token not in index:
            raise ConfigError(f"{path}: no piece {token!r}. The official tokenizer would give it the id of <unk>; "
                              "chattune cannot reproduce such a tokenizer. Is this ChatGLM-6B's ice_text.model?")
    bad = [t for t in dict.fromkeys(SPECIALS + list(names.values())) if kinds[t] not in (_CONTROL, _UNKNOWN)]
    if bad:
        raise ConfigError(f"{path}: special tokens {bad} are not control pieces; ChatGLM-6B's are, and chattune "
                          "reproduces only that layout")
    if NEWLINE not in index or kinds[NEWLINE] != _USER_DEFINED:
        raise ConfigError(f"{path}: no user-defined piece {NEWLINE!r}; ChatGLM-6B's code writes every newline as "
                          "<n>, so this is not a ChatGLM-6B model")
    ids = {key: images + index[token] for key, token in names.items()}
    model_config = _json(folder / "config.json")
    for field, key in CONFIG_IDS.items():
        given = model_config.get(field)
        if isinstance(given, int) and not isinstance(given, bool) and given != ids[key]:
            raise ConfigError(
                f"{folder / 'config.json'}: {field} is {given}, but {names[key]!r} is piece {index[names[key]]} of "
                f"{VOCAB_FILE} + num_image_tokens {images} = id {ids[key]} (tokenizer_config.json's num_image_tokens"
                f"{'' if 'num_image_tokens' in config else ' is absent, so the code default'}); the official "
                "tokenizer would give the model ids it was not trained with. Fix num_image_tokens in "
                "tokenizer_config.json (0 for the current THUDM/chatglm-6b, 20000 for its first release)")
    size = model_config.get("vocab_size")
    if isinstance(size, int) and not isinstance(size, bool) and size < images + len(spm["pieces"]):
        raise ConfigError(f"{folder / 'config.json'}: vocab_size {size} is smaller than the tokenizer's "
                          f"{images + len(spm['pieces'])} ids (num_image_tokens {images} + {len(spm['pieces'])} "
                          f"pieces of {VOCAB_FILE}); the model and the tokenizer do not belong together")
    return {"images": images, "names": names}


def _vocab(spm: dict, images: int) -> list[tuple[str, float, int]]:
    """(token, score for the fast model, piece type) by id: the image tokens, then the SentencePiece pieces."""
    normal = [score for _, score, kind in spm["pieces"] if kind == _NORMAL]
    best = max(normal + [_FLT_MIN]) if normal else _FLT_MIN
    out = [(f"<image_{i}>", _NEVER, 0) for i in range(images)]
    for piece, score, kind in spm["pieces"]:
        if kind == _USER_DEFINED:  # SentencePiece's unigram lattice: always chosen where it matches
            score = len(piece.encode("utf-8")) * best - 0.1
        elif kind != _NORMAL:  # control, unknown, byte, unused: not in SentencePiece's trie
            score = _NEVER
        out.append((piece, score, kind))
    return out


def _normalizer(spm: dict):
    from tokenizers import Regex, normalizers

    steps = [normalizers.Replace("\n", NEWLINE), normalizers.Replace("\t", TAB)]
    steps += [normalizers.Replace(" " * n, f"<|blank_{n}|>") for n in range(MAX_BLANK, 1, -1)]  # longest first
    if spm["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(spm["precompiled_charsmap"]))
    if spm["remove_extra_whitespaces"]:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spm["add_dummy_prefix"]:
        steps.append(normalizers.Prepend("▁"))  # not to an empty text, as SentencePiece
    if spm["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def _decoder(spm: dict):
    from tokenizers import Regex, decoders

    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spm["remove_extra_whitespaces"]:  # SentencePiece drops a leading "▁" of every piece until text appears
        steps.append(decoders.Replace(Regex(r"\A +"), ""))
    elif spm["add_dummy_prefix"]:
        steps.append(decoders.Strip(" ", 1, 0))
    steps += [decoders.Replace(NEWLINE, "\n"), decoders.Replace(TAB, "\t")]
    steps += [decoders.Replace(f"<|blank_{n}|>", " " * n) for n in range(2, MAX_BLANK + 1)]
    return decoders.Sequence(steps)


def _model(spm: dict, vocab: list[tuple[str, float, int]], images: int):
    from tokenizers.models import BPE, Unigram

    unk = images + spm["unk_id"]
    if spm["model_type"] == 1:
        return Unigram([(token, score) for token, score, _ in vocab], unk_id=unk, byte_fallback=spm["byte_fallback"])
    from transformers.convert_slow_tokenizer import generate_merges

    ids = {token: i for i, (token, _, _) in enumerate(vocab)}
    skip = [token for token, _, kind in vocab if kind != _NORMAL]  # SentencePiece merges only normal pieces
    scores = {token: score for token, score, kind in vocab if kind == _NORMAL}
    merges = generate_merges(ids, scores, skip_tokens=skip)
    # ignore_merges: a user-defined piece (isolated by the pre-tokenizer) is looked up whole, never merged
    return BPE(vocab=ids, merges=merges, unk_token=vocab[unk][0], fuse_unk=True, byte_fallback=spm["byte_fallback"],
               dropout=None, ignore_merges=True)


def _user_defined_splitter(vocab: list[tuple[str, float, int]]):
    """(BPE) The user-defined pieces as pre-tokens of their own, in the normalized text. Not added tokens: those
    are normalized too, and the dummy prefix would glue "▁" to one that starts the text."""
    import re

    from tokenizers import Regex, pre_tokenizers

    pieces = sorted((t for t, _, k in vocab if k == _USER_DEFINED), key=len, reverse=True)
    return pre_tokenizers.Split(Regex("|".join(re.escape(p) for p in pieces)), behavior="isolated")


def build_fast_tokenizer(folder: str | Path):
    """The PreTrainedTokenizerFast for a ChatGLM-6B folder (ice_text.model + tokenizer_config.json)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    spm = _read_model(folder)
    layout = _layout(folder, spm)
    images, names = layout["images"], layout["names"]
    vocab = _vocab(spm, images)
    tok = Tokenizer(_model(spm, vocab, images))
    tok.normalizer = _normalizer(spm)
    # No pre-tokenizer (but for BPE's user-defined pieces): SentencePiece segments the whole normalized text.
    tok.decoder = _decoder(spm)
    if spm["model_type"] == 2:  # SentencePiece's BPE splits user-defined pieces off before merging
        tok.pre_tokenizer = _user_defined_splitter(vocab)
    # The tokens ChatGLMTokenizer registers as special are matched with the whitespace around them (transformers
    # 4.2x strips it); the other control pieces are matched as they are.
    registered = {names[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")}
    controls = [t for t, _, k in vocab if k in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True, lstrip=t in registered,
                                       rstrip=t in registered) for t in controls])
    for token in controls:
        if tok.token_to_id(token) != images + [p for p, _, _ in spm["pieces"]].index(token):
            raise ConfigError(f"{folder / VOCAB_FILE}: {token!r} appears twice; chattune cannot reproduce its id")
    gmask, bos, eos = names["gmask_token"], names["bos_token"], names["eos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {gmask} {bos}", pair=f"$A {gmask} {bos} $B:1 {eos}:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys([gmask, bos, eos])])
    named = {names[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")}
    extra = [t for t in controls if t not in named]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=names["unk_token"],
        pad_token=names["pad_token"], mask_token=names["mask_token"], additional_special_tokens=extra,
        padding_side="left", clean_up_tokenization_spaces=True, model_input_names=["input_ids", "attention_mask"],
        # transformers 5 skips the clean-up for BPE models unless told; the official decode always does it
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=spm["model_type"] == 2,
        chattune_glm_family=FAMILY)


def convert_tokenizer(folder: str | Path, out: str | Path, chat_template: str | None = None):
    """Write `out`/tokenizer.json + tokenizer_config.json + special_tokens_map.json for a ChatGLM-6B folder and
    return the PreTrainedTokenizerFast loaded back from `out`."""
    return save_tokenizer(build_fast_tokenizer(folder), out, chat_template)
