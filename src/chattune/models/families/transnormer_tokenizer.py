"""TransNormerLLM's tokenizer (OpenNLPLab/TransNormerLLM-385M, -1B, -7B) as a transformers fast tokenizer, without
its code.

The checkpoints ship Baichuan-7B's tokenizer (their README credits Baichuan for it): `tokenizer.model`, a
SentencePiece BPE model (Baichuan-7B: 64000 pieces, byte fallback, digits split; config.json's vocab_size is 64000
and its pad/bos/eos ids 0/1/2 are `<unk>` `<s>` `</s>`), and the remote-code class
`tokenization_baichuan.BaiChuanTokenizer`, which needs `sentencepiece` and runs only with trust_remote_code.
chattune never runs it: it reads the data files and builds a `PreTrainedTokenizerFast` that gives the same ids.
Everything the model file and tokenizer_config.json decide (normalizer, dummy prefix, add_bos_token, the special
tokens) is read from them, not assumed: the published files themselves (hub LFS) were not available when this was
written, only the class's code.

What the class does, read from its code (facts this module reproduces):
- `_tokenize` is plain `sp_model.encode(text)`: no "legacy" handling. transformers first cuts the text at the
  special tokens `<s>` `</s>` `<unk>` and encodes each piece on its own, so each piece gets SentencePiece's dummy
  prefix `▁` when the model adds one (Baichuan 2's report says Baichuan 1's does).
- `build_inputs_with_special_tokens`: `[bos] if add_bos_token` + ids + `[eos] if add_eos_token` (a pair repeats it
  for the second text). The class defaults are add_bos_token=True, add_eos_token=False; tokenizer_config.json
  overrides them (Baichuan-7B's `encode()` adds no bos). Both are read from the folder.
- pad_token defaults to None; padding_side is transformers' default "right" (the publisher's fine-tune passes
  "right" too); clean_up_tokenization_spaces defaults to False.
- decode is `sp_model.decode` of the pieces between special tokens.

The SentencePiece protobuf is read by glm_tokenizer.py's reader (no `sentencepiece`, no `protobuf`); merges come
from the piece scores, pieces of every kind keep their ids. The normalizer follows the model's own spec (charsmap,
dummy prefix, whitespace removal: SentencePiece removes only spaces, never tabs or newlines); user-defined pieces
are matched in the text as SentencePiece does; byte fallback as the model says.

Choices and known differences:
- pad: tokenizer_config.json's pad_token, else `<unk>` (id 0), the id config.json's pad_token_id names and the
  publisher's fine-tune/train.py sets (`tokenizer.pad_token_id = 0`); the remote class itself has none.
- padding_side: the config's, else "right" (the class's); chattune pads batches for generation itself.
- Special-token strings in text (`</s>` typed by a user, or a rendered chat template) always become the control
  token here. The official class does the same when tokenizer_config.json gives the tokens as plain strings, but
  Baichuan-style configs give them as `AddedToken(single_word=True)`, and then transformers glues a special token
  to a neighbouring chunk with no space between ("answer</s>") and encodes it as text (`</`, `s>`); those ids
  are not reproduced, except that `split_special_tokens=True` gives them when the glued token ends the text (the
  publisher's fine-tune target `output + eos_token`). chattune's templates add eos by id.
- decode(skip_special_tokens=True) equals the official decode; with special tokens kept, the official puts a
  space before each text run that ends at a special token (`<s> hello world</s>`), this one does not.

convert_tokenizer writes tokenizer.json + tokenizer_config.json (with `chattune_family: "transnormer"`) and, when
given one, the chat template, and loads them back.
"""

from __future__ import annotations

import json
from pathlib import Path

from chattune.errors import ConfigError
from chattune.models.families.glm_tokenizer import _sentencepiece_tokenizer, read_sentencepiece, save_tokenizer

FAMILY = "transnormer"
CLASSES = ("BaiChuanTokenizer", "BaichuanTokenizer")  # remote class names that ship this tokenizer
_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # the class's __init__ defaults
_USER_DEFINED = 4  # SentencePiece piece type
_LFS = b"version https://git-lfs"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e})\nfix: copy the file that came with the model") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})\nfix: download the file again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object\nfix: download the file again")
    return data


def _quiet_json(path: Path) -> dict:
    try:
        return _read_json(path) if path.is_file() else {}
    except ConfigError:
        return {}


def _class_names(config: dict) -> list[str]:
    auto = config.get("auto_map")
    auto = auto.get("AutoTokenizer") if isinstance(auto, dict) else None
    names = [config.get("tokenizer_class")] + (list(auto) if isinstance(auto, (list, tuple)) else [auto])
    return [n.rsplit(".", 1)[-1] for n in names if isinstance(n, str)]


def _is_transnormer_model(folder: Path, config: dict) -> bool:
    model = _quiet_json(folder / "config.json")
    if model.get("model_type") == FAMILY:
        return True
    text = json.dumps([model.get("architectures"), model.get("auto_map"), model.get("_name_or_path"),
                       config.get("name_or_path")]).lower()
    return FAMILY in text


def is_transnormer_tokenizer(folder: str | Path) -> bool:
    """True for a folder holding TransNormerLLM's tokenizer: tokenizer_config.json naming BaiChuanTokenizer (class or
    auto_map), a tokenizer.model, and a TransNormerLLM config.json (model_type "transnormer") or name. Read, never
    run; Baichuan's own checkpoints (model_type "baichuan") are not this family."""
    folder = Path(folder)
    config = _quiet_json(folder / "tokenizer_config.json")
    if not any(name in CLASSES for name in _class_names(config)):
        return False
    return (folder / "tokenizer.model").is_file() and _is_transnormer_model(folder, config)


def _token(value, name: str, path: Path) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict ({"__type": "AddedToken",
    "content": ...} as transformers 4.2x wrote it)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"{path}: {name} is {value!r}, neither a string nor an AddedToken\n"
                      f"fix: set {name} to a token string such as {_DEFAULTS.get(name, '<unk>')!r}")


def _normalizer(spm: dict):
    """SentencePiece's normalizer for this model: charsmap, then (remove_extra_whitespaces) leading and trailing
    spaces dropped and runs of spaces made one, then the dummy prefix, then spaces escaped as ▁. SentencePiece
    treats only ' ' as whitespace here: tabs and newlines stay."""
    from tokenizers import Regex, normalizers

    steps = []
    if spm["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(spm["precompiled_charsmap"]))
    if spm["remove_extra_whitespaces"]:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spm["add_dummy_prefix"]:
        steps.append(normalizers.Prepend("▁"))
    if spm["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps) if steps else None


def _model_file(folder: Path) -> Path:
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise ConfigError(f"{path}: missing\nfix: copy tokenizer.model from the TransNormerLLM checkpoint "
                          "(OpenNLPLab/TransNormerLLM-*) into the folder")
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(_LFS):
        raise ConfigError(f"{path}: a Git LFS pointer, not the SentencePiece model\nfix: fetch the real file "
                          "(`git lfs pull` in the checkout, or download it from the model's hub page)")
    return path


def build_fast_tokenizer(folder: str | Path):
    """The PreTrainedTokenizerFast for a TransNormerLLM folder (no chat template; see convert_tokenizer)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        raise ConfigError(f"{config_path}: missing\nfix: copy tokenizer_config.json from the TransNormerLLM "
                          "checkpoint into the folder")
    config = _read_json(config_path)
    if not any(name in CLASSES for name in _class_names(config)):
        found = ", ".join(_class_names(config)) or "none"
        raise ConfigError(f"{config_path}: tokenizer class {found}, not TransNormerLLM's BaiChuanTokenizer\n"
                          "fix: point at a TransNormerLLM checkpoint folder (OpenNLPLab/TransNormerLLM-*)")
    path = _model_file(folder)
    spm = read_sentencepiece(path)
    if spm["model_type"] != 2 or spm["treat_whitespace_as_suffix"] or not spm["pieces"]:
        raise ConfigError(f"{path}: not a SentencePiece BPE model with the whitespace marker as a prefix (as "
                          "TransNormerLLM's is)\nfix: use the tokenizer.model that came with the checkpoint")
    tok = _sentencepiece_tokenizer(spm)
    tok.normalizer = _normalizer(spm)
    vocab = tok.get_vocab()
    # user-defined pieces: SentencePiece matches them in the text and never merges them with their neighbours
    user = [piece for piece, _, kind in spm["pieces"] if kind == _USER_DEFINED]
    tok.add_tokens([AddedToken(piece, normalized=True, special=False) for piece in user])

    names = {name: _token(config.get(name, default), name, config_path) for name, default in _DEFAULTS.items()}
    names["pad_token"] = _token(config.get("pad_token"), "pad_token", config_path) or names["unk_token"]
    for name, token in names.items():
        if token is not None and token not in vocab:
            raise ConfigError(f"{config_path}: {name} {token!r} is not a piece of {path.name}, so its id is not "
                              f"the model's\nfix: set {name} to a piece of the model ({_DEFAULTS.get(name, '<unk>')!r}"
                              " in TransNormerLLM's)")
    # matched in text, skipped when decoding, on their model ids (they are control pieces of the model)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(names.values()) if t])

    add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
    if not isinstance(add_bos, bool) or not isinstance(add_eos, bool):
        raise ConfigError(f"{config_path}: add_bos_token / add_eos_token must be true or false\n"
                          "fix: set them as the checkpoint's own tokenizer_config.json does (both false)")
    padding_side = config.get("padding_side", "right")
    if padding_side not in ("left", "right"):
        raise ConfigError(f"{config_path}: padding_side {padding_side!r}\nfix: \"left\" or \"right\"")
    extra = {}
    if isinstance(config.get("model_max_length"), int):
        extra["model_max_length"] = config["model_max_length"]
    # passing add_bos_token / add_eos_token makes transformers build the post-processor the class's
    # build_inputs_with_special_tokens matches: [bos] A [eos], and [bos] A [eos] [bos] B [eos] for a pair
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, **names, add_bos_token=add_bos, add_eos_token=add_eos, padding_side=padding_side,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        chattune_family=FAMILY, **extra)


def convert_tokenizer(folder: str | Path, out: str | Path, chat_template: str | None = None):
    """Write `out`/tokenizer.json + tokenizer_config.json (and chat_template.jinja when a template is given) and
    return the tokenizer loaded back from them."""
    return save_tokenizer(build_fast_tokenizer(folder), out, chat_template)
