"""TransNormerLLM's tokenizer converted to a fast tokenizer gives the publisher's ids, without its code.

The real tokenizer.model is a hub LFS file, so the tests build tiny twins (below, deterministic, nothing downloaded):
a 566-piece SentencePiece BPE model laid out as TransNormerLLM's (Baichuan-7B's): `<unk>` `<s>` `</s>` (ids 0 1 2),
the 256 byte pieces, merges building English, Chinese and whitespace pieces, single digits only, one unused piece;
byte fallback, identity normalizer, dummy prefix, whitespace kept (the real file's settings as Baichuan describes
them; the file itself was not available). Two folders: "published" has tokenizer_config.json laid out as
Baichuan-7B's (BaiChuanTokenizer, add_bos_token/add_eos_token false, special tokens as single-word AddedTokens);
"variant" gives the special tokens as plain strings, keeps the class default add_bos_token (true), adds an eos and a
pad token, and its model has no dummy prefix, removes extra whitespace and has a user-defined piece `<sep>`.

How the OFFICIAL numbers were produced (once, outside the repository, /tmp/ref): the publisher's
`tokenization_baichuan.py` (class BaiChuanTokenizer) run on these twins through
`AutoTokenizer.from_pretrained(folder, trust_remote_code=True)` in a venv with transformers 4.37.2,
sentencepiece 0.2.3, tokenizers 0.15.2, torch 2.13.0 (CPU), Python 3.11.7. The file, unpatched, is the copy of
OpenNLPLab/TransNormerLLM-385M's hub code in github weigao266/TNL-MoE, commit
0b5d4e32880dac439e2a209eeef3c79d1bc6a62d ("add transnormerllm models"), smoe/models/tnl/tokenization_baichuan.py
(md5 b011e5f41ebc4c0dcfa8a423996ed731).
- texts: `tok(text)["input_ids"]`, `tok(text, add_special_tokens=False)["input_ids"]` and
  `tok.decode(ids, skip_special_tokens=True)`; the "plain" column is the same folder loaded with
  `bos_token="<s>", eos_token="</s>", unk_token="<unk>"` passed as strings (no single_word).
- pair: `tok("hello", "world")`; split_special_tokens: `tok("hello </s> world", split_special_tokens=True)`.
- train: OpenNLPLab/TransnormerLLM fine-tune/train.py's preprocess (commit 95ff63ab2c40499f01fdff3589eeacdbc51c6c79):
  pad_token_id = 0, source "Human:\\n你好\\nAssistant:\\n", target "hello world" + tok.eos_token, input_ids =
  tok(source + target), labels = -100 over the source's non-pad ids.
"""

import json
import sys
from pathlib import Path

import pytest

from chattune.errors import ConfigError
from chattune.models.families.transnormer_tokenizer import (
    build_fast_tokenizer,
    convert_tokenizer,
    is_transnormer_tokenizer,
)

# --- twins: pure-stdlib builders of tiny TransNormerLLM tokenizer folders (copied verbatim into the test, less the
# imports json, struct and pathlib.Path above)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


from protobuf_twin import _field  # noqa: E402 - the wire format the twins share


WORDS = ["▁hello", "▁world", "▁Hello", "▁World", "hello", "world", "▁the", "▁is", "▁a", "ing", "▁test", "▁line",
         "line", "▁tab", "▁end", "▁text", "▁English", "▁mixed", "▁digits", "▁emoji", "▁leading", "▁spaces",
         "▁trailing", "trailing", "▁Human", "Human", "▁Assistant", "Assistant", "▁hi", "hi", "▁there", "▁you",
         "▁can", "▁answer", "▁question", "▁你好", "你好", "世界", "▁中文", "中文", "▁北京", "天气", "▁问题", "回答",
         "▁▁", "▁▁▁▁", "</", "<s", "s>", "unk", "▁system", "▁user", "▁assistant"]


def pieces(user_defined: tuple[str, ...] = ()) -> list[tuple[str, float, int]]:
    """A SentencePiece BPE vocab laid out as TransNormerLLM's (Baichuan-7B's): <unk> <s> </s>, the 256 byte pieces,
    merged pieces (score = -rank, each reachable by merging two shorter pieces: every prefix of a word is a piece),
    the single characters (no piece of two digits: the model splits digits), optional user-defined pieces, and one
    unused piece."""
    merged: list[str] = []
    for word in WORDS:
        for end in range(2, len(word) + 1):
            if word[:end] not in merged:
                merged.append(word[:end])
    chars = sorted({c for w in WORDS for c in w} | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
                   | set("0123456789,.!?:;'\"()[]{}<>|/_-=+*#@&%$`~") | set("你好世界中文问答用户工具天气今北京的是，。：？！"))
    out = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    out += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    out += [(p, -float(i), NORMAL) for i, p in enumerate(merged)]
    out += [(c, -float(len(merged) + i), NORMAL) for i, c in enumerate(chars) if c not in merged]
    out += [(p, 0.0, USER_DEFINED) for p in user_defined]
    out += [("<unused0>", 0.0, UNUSED)]
    return out


def model_bytes(add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False,
                user_defined: tuple[str, ...] = ()) -> bytes:
    """tokenizer.model: BPE, byte fallback, split digits, identity normalizer (no charsmap), whitespace escaped."""
    ps = pieces(user_defined)
    body = b"".join(_field(1, _field(1, p) + _field(2, s) + _field(3, t)) for p, s, t in ps)
    trainer = (_field(3, 2) + _field(4, len(ps)) + _field(25, True) + _field(35, True) + _field(40, 0)
               + _field(41, 1) + _field(42, 2) + _field(43, -1))
    normalizer = (_field(1, "identity") + _field(3, add_dummy_prefix) + _field(4, remove_extra_whitespaces)
                  + _field(5, True))
    return body + _field(2, trainer) + _field(3, normalizer)


def _added(content: str) -> dict:
    """A special token as tokenizer_config.json written by transformers 4.2x holds it (Baichuan-7B's layout)."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": True}


VARIANTS = {
    # Baichuan-7B's tokenizer_config.json layout: no bos/eos added, special tokens as single-word AddedTokens
    "published": {"config": {"add_bos_token": False, "add_eos_token": False, "bos_token": _added("<s>"),
                             "eos_token": _added("</s>"), "unk_token": _added("<unk>"),
                             "clean_up_tokenization_spaces": False, "model_max_length": 2 ** 40,
                             "sp_model_kwargs": {}},
                  "model": {}},
    # plain-string special tokens, the class defaults for add_bos_token (True), an eos added, a pad token, and a
    # model without dummy prefix that collapses whitespace and has a user-defined piece
    "variant": {"config": {"add_eos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                           "pad_token": "<unk>"},
                "model": {"add_dummy_prefix": False, "remove_extra_whitespaces": True, "user_defined": ("<sep>",)}},
}


def write_twin(folder, variant: str = "published") -> Path:
    """A TransNormerLLM folder as published, minus the weights and the remote code: tokenizer.model,
    tokenizer_config.json (class and auto_map as the publisher's), config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = VARIANTS[variant]
    (folder / "tokenizer.model").write_bytes(model_bytes(**spec["model"]))
    config = {"auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaiChuanTokenizer", None]},
              "tokenizer_class": "BaiChuanTokenizer", **spec["config"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "transnormer", "architectures": ["TransnormerForCausalLM"], "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, "vocab_size": 64000, "add_bos_token": False,
        "auto_map": {"AutoConfig": "configuration_transnormer.TransnormerConfig",
                     "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM"}}))
    return folder
# --- end twins


# ---------------------------------------------------------------- the official ids (see the module docstring)

OFFICIAL = {
    'published': {
        'specials': {'bos': ['<s>', 1], 'eos': ['</s>', 2], 'unk': ['<unk>', 0], 'pad': [None, None]},
        'add_bos_eos': [False, False], 'padding_side': 'right',
        'clean_up_tokenization_spaces': False,
        # text: (ids, ids with add_special_tokens=False or None when the same, decode(ids, skip_special_tokens=True),
        #        ids when the special tokens are given as plain strings, or None when the same)
        'texts': {
            'hello world': ([263, 268], None, 'hello world', None),
            'Hello World!': ([273, 278, 446], None, 'Hello World!', None),
            '你好，世界': ([409, 562, 411], None, '你好，世界', None),
            '  leading spaces': ([421, 339, 345], None, '  leading spaces', None),
            'trailing  ': ([352, 421], None, 'trailing  ', None),
            'a  b   c': ([292, 421, 509, 421, 392], None, 'a  b   c', None),
            'line1\nline2\n\nline3': ([301, 462, 13, 304, 463, 13, 13, 304, 464], None, 'line1\nline2\n\nline3', None),
            '\ttab\tsep': ([538, 12, 527, 508, 509, 12, 526, 512, 523], None, '\ttab\tsep', None),
            'emoji 😀🎉': ([333, 538, 243, 162, 155, 131, 243, 162, 145, 140], None, 'emoji 😀🎉', None),
            'digits 1234567 2024': ([329, 538, 462, 463, 464, 465, 466, 467, 468, 538, 463, 461, 463, 465], None,
                                    'digits 1234567 2024', None),
            'mixed 中文 English 123': ([323, 413, 318, 538, 462, 463, 464], None, 'mixed 中文 English 123', None),
            '': ([], None, '', None),
            ' ': ([421], None, ' ', None),
            '\n': ([538, 13], None, '\n', None),
            'a<sep>b': ([292, 425, 512, 523, 475, 509], None, 'a<sep>b', None),
            'Human:\n你好\nAssistant:\n': ([363, 471, 13, 410, 13, 384, 471, 13], None, 'Human:\n你好\nAssistant:\n', None),
            'hello world</s>': ([263, 268, 424, 426], None, 'hello world</s>', [263, 268, 2]),
            '</s> end': ([2, 538, 309], None, ' end', None),
            'hello </s> world': ([263, 538, 2, 538, 268], None, 'hello   world', None),
            'a</s>b': ([292, 424, 426, 538, 509], None, 'a</s> b', [292, 2, 538, 509]),
            '<s>Human: hi': ([538, 425, 475, 367, 471, 385], None, '<s>Human: hi', [1, 363, 471, 385]),
            '<s> hi': ([1, 538, 385], None, ' hi', None),
            'x <unk> y': ([538, 531, 538, 0, 538, 389], None, 'x   y', None),
            '<unk>': ([0], None, '', None),
            'hi</s>\n<s>there': ([385, 424, 426, 538, 13, 425, 475, 388], None, 'hi</s> \n<s> there',
                                 [385, 2, 538, 13, 1, 388]),
        },
        'pair': [263, 268],
        'split_special_tokens': [263, 538, 424, 426, 268],
        'train': {'input_ids': [363, 471, 13, 410, 13, 384, 471, 13, 282, 268, 424, 426],
                  'labels': [-100, -100, -100, -100, -100, -100, -100, -100, 282, 268, 424, 426]},
    },
    'variant': {
        'specials': {'bos': ['<s>', 1], 'eos': ['</s>', 2], 'unk': ['<unk>', 0], 'pad': ['<unk>', 0]},
        'add_bos_eos': [True, True], 'padding_side': 'right',
        'clean_up_tokenization_spaces': False,
        # text: (ids, ids with add_special_tokens=False or None when the same, decode(ids, skip_special_tokens=True),
        #        ids when the special tokens are given as plain strings, or None when the same)
        'texts': {
            'hello world': ([1, 282, 268, 2], [282, 268], 'hello world', None),
            'Hello World!': ([1, 485, 512, 519, 519, 522, 278, 446, 2], [485, 512, 519, 519, 522, 278, 446],
                             'Hello World!', None),
            '你好，世界': ([1, 410, 562, 411, 2], [410, 562, 411], '你好，世界', None),
            '  leading spaces': ([1, 519, 512, 508, 511, 294, 345, 2], [519, 512, 508, 511, 294, 345],
                                 'leading spaces', None),
            'trailing  ': ([1, 359, 2], [359], 'trailing', None),
            'a  b   c': ([1, 508, 538, 509, 392, 2], [508, 538, 509, 392], 'a b c', None),
            'line1\nline2\n\nline3': ([1, 304, 462, 13, 304, 463, 13, 13, 304, 464, 2],
                                      [304, 462, 13, 304, 463, 13, 13, 304, 464], 'line1\nline2\n\nline3', None),
            '\ttab\tsep': ([1, 12, 527, 508, 509, 12, 526, 512, 523, 2], [12, 527, 508, 509, 12, 526, 512, 523],
                           '\ttab\tsep', None),
            'emoji 😀🎉': ([1, 512, 520, 522, 517, 516, 538, 243, 162, 155, 131, 243, 162, 145, 140, 2],
                         [512, 520, 522, 517, 516, 538, 243, 162, 155, 131, 243, 162, 145, 140], 'emoji 😀🎉', None),
            'digits 1234567 2024': ([1, 511, 516, 514, 516, 527, 526, 538, 462, 463, 464, 465, 466, 467, 468, 538,
                                     463, 461, 463, 465, 2],
                                    [511, 516, 514, 516, 527, 526, 538, 462, 463, 464, 465, 466, 467, 468, 538, 463,
                                     461, 463, 465], 'digits 1234567 2024', None),
            'mixed 中文 English 123': ([1, 520, 516, 531, 512, 511, 413, 318, 538, 462, 463, 464, 2],
                                     [520, 516, 531, 512, 511, 413, 318, 538, 462, 463, 464], 'mixed 中文 English 123',
                                     None),
            '': ([1, 2], [], '', None),
            ' ': ([1, 2], [], '', None),
            '\n': ([1, 13, 2], [13], '\n', None),
            'a<sep>b': ([1, 508, 565, 509, 2], [508, 565, 509], 'a<sep>b', None),
            'Human:\n你好\nAssistant:\n': ([1, 367, 471, 13, 410, 13, 384, 471, 13, 2],
                                         [367, 471, 13, 410, 13, 384, 471, 13], 'Human:\n你好\nAssistant:\n', None),
            'hello world</s>': ([1, 282, 268, 2, 2], [282, 268, 2], 'hello world', None),
            '</s> end': ([1, 2, 512, 521, 511, 2], [2, 512, 521, 511], 'end', None),
            'hello </s> world': ([1, 282, 2, 286, 2], [282, 2, 286], 'helloworld', None),
            'a</s>b': ([1, 508, 2, 509, 2], [508, 2, 509], 'ab', None),
            '<s>Human: hi': ([1, 1, 367, 471, 385, 2], [1, 367, 471, 385], 'Human: hi', None),
            '<s> hi': ([1, 1, 386, 2], [1, 386], 'hi', None),
            'x <unk> y': ([1, 531, 0, 532, 2], [531, 0, 532], 'xy', None),
            '<unk>': ([1, 0, 2], [0], '', None),
            'hi</s>\n<s>there': ([1, 386, 2, 13, 1, 527, 279, 525, 512, 2], [386, 2, 13, 1, 527, 279, 525, 512],
                                 'hi\nthere', None),
        },
        'pair': [1, 282, 2, 1, 286, 2],
        'split_special_tokens': [1, 282, 538, 424, 426, 268, 2],
        'train': {'input_ids': [1, 367, 471, 13, 410, 13, 384, 471, 13, 282, 268, 2, 2],
                  'labels': [-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 268, 2, 2]},
    },
}

REFUSE = "raise RuntimeError('the publisher\\'s tokenizer code must not run')\n"


def _twin(folder, variant="published"):
    """The twin with a tokenization_baichuan.py that refuses to run: nothing here may import it."""
    folder = write_twin(folder, variant)
    (folder / "tokenization_baichuan.py").write_text(REFUSE)
    return folder


@pytest.fixture(scope="module", params=["published", "variant"])
def converted(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    return request.param, convert_tokenizer(_twin(base / "model", request.param), base / "fast")


def test_a_transnormer_folder_is_recognised(tmp_path):
    for variant in VARIANTS:
        assert is_transnormer_tokenizer(_twin(tmp_path / variant, variant))
    baichuan = _twin(tmp_path / "baichuan")  # Baichuan-7B itself ships the same class with model_type "baichuan"
    (baichuan / "config.json").write_text(json.dumps({"model_type": "baichuan", "architectures": ["BaiChuanForCausalLM"]}))
    assert not is_transnormer_tokenizer(baichuan)
    glm = _twin(tmp_path / "glm")
    (glm / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}))
    assert not is_transnormer_tokenizer(glm)
    missing = _twin(tmp_path / "missing")
    (missing / "tokenizer.model").unlink()
    assert not is_transnormer_tokenizer(missing)
    assert not is_transnormer_tokenizer(tmp_path / "nowhere")


def test_texts_give_the_official_ids(converted):
    variant, tok = converted
    for text, (ids, bare, _, plain) in OFFICIAL[variant]["texts"].items():
        # special-token strings are control tokens here; with Baichuan's single-word AddedTokens the official class
        # glues one to a neighbour with no space between and encodes it as text ("plain" is the official result
        # without single_word, the same folder's tokens given as strings)
        want = ids if plain is None else plain
        assert tok(text)["input_ids"] == want, text
        assert tok(text, add_special_tokens=False)["input_ids"] == (want if bare is None else bare), text


def test_decode_equals_the_official(converted):
    variant, tok = converted
    for text, (ids, _, decoded, _) in OFFICIAL[variant]["texts"].items():
        assert tok.decode(ids, skip_special_tokens=True) == decoded, text
        if variant == "published" and not set(ids) & {0, 1, 2}:
            assert tok.decode(ids) == decoded, text


def test_special_tokens_pair_and_settings(converted):
    variant, tok = converted
    official = OFFICIAL[variant]
    specials = official["specials"]
    assert [tok.bos_token, tok.bos_token_id] == specials["bos"]
    assert [tok.eos_token, tok.eos_token_id] == specials["eos"]
    assert [tok.unk_token, tok.unk_token_id] == specials["unk"]
    # the official class has no pad token unless the config names one; chattune pads with <unk> (id 0), as the
    # publisher's fine-tune and config.json's pad_token_id do
    assert [tok.pad_token, tok.pad_token_id] == (specials["pad"] if specials["pad"][0] else ["<unk>", 0])
    assert tok.padding_side == official["padding_side"]
    assert tok.clean_up_tokenization_spaces == official["clean_up_tokenization_spaces"]
    assert tok("hello", "world")["input_ids"] == official["pair"]
    assert tok("hello </s> world", split_special_tokens=True)["input_ids"] == official["split_special_tokens"]


def test_the_publishers_fine_tune_sample(converted):
    variant, tok = converted
    train = OFFICIAL[variant]["train"]
    source, target = "Human:\n你好\nAssistant:\n", "hello world" + tok.eos_token
    if variant == "published":
        # "answer</s>": the official single-word eos is glued to the answer and encoded as text (`</`, `s>`),
        # which split_special_tokens=True reproduces; chattune's own templates add eos by id instead
        assert tok(source + target, split_special_tokens=True)["input_ids"] == train["input_ids"]
        assert tok(source + target)["input_ids"] == train["input_ids"][:-2] + [tok.eos_token_id]
    else:
        assert tok(source + target)["input_ids"] == train["input_ids"]
        source_len = len(tok(source)["input_ids"])
        assert [-100] * source_len + train["input_ids"][source_len:] == train["labels"]


def test_saved_folder_reloads_with_the_same_ids_and_marker(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    # neither sentencepiece nor protobuf is needed, and the publisher's code never runs
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for variant in VARIANTS:
        out = tmp_path / f"{variant}-fast"
        tok = convert_tokenizer(_twin(tmp_path / variant, variant), out, chat_template=template)
        assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
        assert not (out / "tokenization_baichuan.py").exists()
        saved = json.loads((out / "tokenizer_config.json").read_text())
        assert saved["chattune_family"] == "transnormer"
        assert (out / "chat_template.jinja").read_text() == template  # where transformers 5 saves it
        again = AutoTokenizer.from_pretrained(str(out))
        built = build_fast_tokenizer(tmp_path / variant)
        for text, (ids, _, _, plain) in OFFICIAL[variant]["texts"].items():
            want = ids if plain is None else plain
            assert tok(text)["input_ids"] == again(text)["input_ids"] == built(text)["input_ids"] == want, text
        assert again.chat_template == template and again.pad_token_id == 0
        assert again.decode(again("hello world 你好")["input_ids"], skip_special_tokens=True) == "hello world 你好"


def _broken(tmp_path, name, change):
    folder = _twin(tmp_path / name)
    change(folder)
    return folder


def _config(folder, **fields):
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("name, change, message", [
    ("no_config", lambda f: (f / "tokenizer_config.json").unlink(), r"tokenizer_config.json: missing\nfix: copy"),
    ("bad_json", lambda f: (f / "tokenizer_config.json").write_text("{"), r"tokenizer_config.json: not valid JSON"),
    ("other_class", lambda f: _config(f, tokenizer_class="LlamaTokenizer", auto_map={}),
     r"tokenizer class LlamaTokenizer, not TransNormerLLM's BaiChuanTokenizer\nfix: point at"),
    ("no_model", lambda f: (f / "tokenizer.model").unlink(), r"tokenizer.model: missing\nfix: copy tokenizer.model"),
    ("lfs", lambda f: (f / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n"),
     r"a Git LFS pointer, not the SentencePiece model\nfix: fetch the real file"),
    ("garbage", lambda f: (f / "tokenizer.model").write_bytes(b"\x0f\xff\xff"), r"tokenizer.model"),
    ("unigram", lambda f: (f / "tokenizer.model").write_bytes(model_bytes() + _field(2, _field(3, 1))),
     r"not a SentencePiece BPE model"),
    ("bos", lambda f: _config(f, bos_token="<|begin|>"), r"bos_token '<\|begin\|>' is not a piece of tokenizer.model"),
    ("flag", lambda f: _config(f, add_bos_token="yes"), r"add_bos_token / add_eos_token must be true or false"),
])
def test_errors_name_the_file_and_the_fix(tmp_path, name, change, message):
    folder = _broken(tmp_path, name, change)
    with pytest.raises(ConfigError, match=message):
        build_fast_tokenizer(folder)
