"""ChatGLM-6B's (THUDM/chatglm-6b, GLM v1) tokenizer converted to a fast tokenizer gives the publisher's ids.

The real ice_text.model is a 2.7 MB hub LFS file, so the tests build tiny twins (below, deterministic, pure
stdlib, nothing downloaded) laid out as the real one: `<unk> <s> </s> <pad>` (unknown, control), `<n>` (user
defined), "▁" and the normal pieces, then the 8 control specials `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop>
<ENC> <dBLOCK>`, `<|tab|>` and `<|blank_2|>`..`<|blank_80|>` (user defined) and the 256 byte pieces; byte fallback,
an nmt_nfkc-style precompiled charsmap (12 NFKC rules: full-width punctuation, U+3000 and U+00A0 to a space, "ﬁ",
...; a darts-clone trie written here), add_dummy_prefix and remove_extra_whitespaces on. Three twins: a unigram
model (the real model's type) with num_image_tokens 0 (the current release), the same with num_image_tokens absent
from tokenizer_config.json (the code's default 20000, the first release's layout) and a BPE model.

How the OFFICIAL numbers were produced (once, outside the repository, in /tmp): the publisher's
`tokenization_chatglm.py` from github greensheng/chatglm-6b (a mirror of the hub repo THUDM/chatglm-6b with its
history), commit 8b7d33596d18c5e83e2da052d05ca4db02e60620 (the file's last change is 4d0fc39 "Update decode method
in tokenizer"), unpatched, copied into each twin folder and loaded with
`AutoTokenizer.from_pretrained(folder, trust_remote_code=True)` in a venv with Python 3.11.7, transformers 4.27.1
(the version the code was written for), tokenizers 0.13.3, sentencepiece 0.2.3, numpy 1.26.4, protobuf 7.36.2, no
torch (the tokenizer does not need it). Recorded per twin:
- encode: `tokenizer.encode(text)` for each of TEXTS (`encode(text, add_special_tokens=False)` was checked to be the
  same without the trailing [gMASK] <sop>); decode: `tokenizer.decode(encode(text), skip_special_tokens=True)` where
  it differs from the text;
- pairs: `build_inputs_with_special_tokens(encode(a, False), encode(b, False))` for PAIRS (= `tokenizer(a, b)`);
- chat: `tokenizer([prompt])["input_ids"][0]` for chat()/stream_chat()'s prompt of QUERY without and with HISTORY;
- train: ptuning/main.py's preprocess_function_train (THUDM/ChatGLM-6B): `build_inputs_with_special_tokens(
  encode(prompt, False), encode(ANSWER, False))` for QUERY with HISTORY; labels are -100 up to `<sop>`
  (train_context of them) and the ids from `<sop>` on;
- batch: `tokenizer(["hi", "hello world"], padding=True)["input_ids"]` (left padding with <pad>);
- decodes: `decode(ids, skip_special_tokens=True)` of a few id lists.
Under transformers 4.27 the code matches `<sop> <eop> <unk> <pad> [MASK]` in text (stripping the whitespace
around them) and nothing else; `[gMASK]`, `[sMASK]`, `</s>`, `<s>` are plain text there.
"""

import json
import struct
import sys
from pathlib import Path

import pytest

from chattune.errors import ConfigError
from chattune.models.families.chatglm6b_tokenizer import (
    build_fast_tokenizer,
    convert_tokenizer,
    is_chatglm6b_tokenizer,
)

# --- twins: pure-stdlib builder of tiny ChatGLM-6B tokenizer folders (uses json, struct, Path)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
WHITESPACE = ["<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]


from protobuf_twin import _field  # noqa: E402 - the wire format the twins share


# A few NFKC rules, as the real model's nmt_nfkc charsmap has them (full-width punctuation -> ASCII etc.).
CHARSMAP_RULES = {"，": ",", "！": "!", "：": ":", "？": "?", "；": ";", "（": "(", "）": ")", "\u3000": " ",
                  "\u00a0": " ", "ﬁ": "fi", "Ａ": "A", "１": "1"}


def precompiled_charsmap(rules: dict[str, str]) -> bytes:
    """SentencePiece's precompiled_charsmap: u32 trie size, a darts-clone double array (UTF-8 source -> offset of
    the replacement) and the NUL-terminated replacements. Every trie node gets its own 256-unit block."""
    blob, values = bytearray(), {}
    for src, dst in sorted(rules.items()):
        values[src.encode()] = len(blob)
        blob += dst.encode() + b"\0"
    root: dict = {}
    for key, value in values.items():
        node = root
        for b in key:
            node = node.setdefault(b, {})
        node[None] = value
    empty = 1 << 31  # never equal to a label: unused slots match no input byte
    units = [empty] * 256

    def place(node: dict, pos: int) -> None:
        base = len(units)
        units.extend([empty] * 256)
        units[pos] |= (pos ^ base) << 10  # offset: pos ^ offset lands on the node's block
        if None in node:
            units[pos] |= 1 << 8  # has_leaf; the value sits at label 0 of the block
            units[base] = node[None] | (1 << 31)
        for label, child in node.items():
            if label is not None:
                units[base + label] = label
                place(child, base + label)

    units[0] = 0
    place(root, 0)
    trie = b"".join(struct.pack("<I", u) for u in units)
    return struct.pack("<I", len(trie)) + trie + bytes(blob)


COMMON = ["▁", ",", ".", "0", "1", ":", "-", "2", "3", "!", "?", "4", "5", "6", "7", "8", "9", ";", "(", ")", "[",
          "▁[", "]", "<", ">", "|", "/", "_", "'", "\"", "=", "+", "*", "#", "@", "&", "%", "$", "~", "`", "{", "}",
          "\\", "^"]
WORDS = ["▁the", "▁hello", "hello", "▁world", "world", "▁Hello", "▁World", "▁a", "▁is", "▁I", "'m", "n't", "'s",
         "▁don", "▁it", "▁test", "ing", "▁def", "▁main", "():", "print", "('", "')", "▁#", "▁greeting", "Round",
         "▁Chat", "GL", "MASK", "▁line", "line", "▁tab", "▁end", "▁text", "▁English", "▁mixed", "▁digits",
         "▁emoji", "▁you", "▁can", "▁x", "▁y", "▁spaces", "▁leading", "▁trailing", "▁fine", "▁of", "▁question",
         "▁answer", "▁Hi", "▁there", "fi", "op", "sop", "eop", "▁sop", "unk", "pad", "image", "blank", "tab", "▁<",
         "<|", "|>", "▁\"", "\":", "▁{", "ENC", "BLOCK", "unused"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
CJK = ["。", "你好", "世界", "你", "好", "世", "界", "我是", "我", "是", "问", "答", "中文", "中", "文", "北京", "北",
       "京", "天气", "天", "气", "今天", "今", "的", "晚上", "晚", "上", "睡不着", "睡", "不", "着", "怎么办", "怎么",
       "怎", "么", "办", "人工智能", "助手", "很", "高兴", "见到", "欢迎", "任何", "问题", "题", "清华", "大学", "介绍",
       "一下", "一", "下", "年", "创建", "于", "哪", "它", "训练", "时间", "用户", "工具"]


def normal_pieces(kind: str) -> list[tuple[str, float]]:
    """unigram: pieces sorted by score as SentencePiece's unigram trainer writes them (log-probabilities, common
    punctuation first, words and single characters interleaved). bpe: merged pieces by rank (score -rank; every one
    a merge of two shorter ones) and then the single characters, as SentencePiece's BPE trainer writes them."""
    if kind == "unigram":
        ordered = COMMON + WORDS[:30] + LETTERS[:26] + CJK[:30] + WORDS[30:] + LETTERS[26:] + CJK[30:]
        return [(p, round(-2.5 - 0.125 * i, 3)) for i, p in enumerate(ordered)]
    merged: list[str] = []
    for word in WORDS + [w for w in CJK if len(w) > 1]:
        for end in range(2, len(word) + 1):
            if word[:end] not in merged:
                merged.append(word[:end])
    chars = []
    for c in "".join(COMMON + WORDS + LETTERS + CJK):
        if c not in chars and c not in merged:
            chars.append(c)
    return [(p, -float(i)) for i, p in enumerate(merged + chars)]


def ice_pieces(kind: str = "unigram") -> list[tuple[str, float, int]]:
    """The real ice_text.model's layout: <unk> <s> </s> <pad> <n>, the normal pieces, then what THUDM's GLM-130B
    tokenizer appends to icetk's text model: the 8 special tokens (control), <|tab|> and <|blank_2..80|> (user
    defined) and the 256 byte pieces."""
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL), ("<pad>", 0.0, CONTROL),
              ("<n>", 0.0, USER_DEFINED)]
    pieces += [(p, s, NORMAL) for p, s in normal_pieces(kind)]
    pieces += [(t, 0.0, CONTROL) for t in SPECIALS] + [(t, 0.0, USER_DEFINED) for t in WHITESPACE]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    return pieces


def ice_model_bytes(kind: str = "unigram", pieces=None) -> bytes:
    pieces = ice_pieces(kind) if pieces is None else pieces
    body = b"".join(_field(1, _field(1, p) + _field(2, s) + _field(3, t)) for p, s, t in pieces)
    trainer = (_field(3, 1 if kind == "unigram" else 2) + _field(4, len(pieces)) + _field(35, True)
               + _field(40, 0) + _field(41, 1) + _field(42, 2) + _field(43, 3))
    normalizer = (_field(1, "nmt_nfkc") + _field(2, precompiled_charsmap(CHARSMAP_RULES)) + _field(3, True)
                  + _field(4, True) + _field(5, True))
    return body + _field(2, trainer) + _field(3, normalizer)


def write_twin(folder, kind: str = "unigram", num_image_tokens: int | None = 0, pieces=None) -> Path:
    """A ChatGLM-6B folder as published, minus weights and remote code: ice_text.model, tokenizer_config.json and
    config.json (ids scaled to the twin). num_image_tokens None leaves it out of tokenizer_config.json (the
    publisher's code then uses 20000, as the first release did)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = ice_pieces(kind) if pieces is None else pieces
    (folder / "ice_text.model").write_bytes(ice_model_bytes(kind, pieces))
    config = {"name_or_path": "THUDM/chatglm-6b", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
              "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
              "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
              "num_image_tokens": num_image_tokens,
              "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    if num_image_tokens is None:
        del config["num_image_tokens"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    offset = 20000 if num_image_tokens is None else num_image_tokens
    first = offset + [p for p, _, _ in pieces].index("[MASK]")
    (folder / "config.json").write_text(json.dumps({
        "_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "bos_token_id": first + 4, "eos_token_id": first + 5, "mask_token_id": first, "gmask_token_id": first + 1,
        "pad_token_id": offset + 3, "vocab_size": offset + len(pieces) + 184}, indent=2))
    return folder
# --- end twins

TEXTS = ["hello world", "Hello World!", "你好，世界！", "  leading spaces", "trailing  ", "trailing ", " lead",
         "a  b   c", "line1\nline2\n\nline3", "\ttab\tsep", "def main():\n    print('hello world')\t# greeting",
         "emoji 😀🎉", "digits 1234567 2024", "mixed 中文 English 123", "", " ", "\n", "x" + " " * 85 + "y",
         " " * 81, "a\u3000\u3000b 全角：ﬁ", "I'm fine , don't you ?", "hello . world , ok ! it 's",
         "<|tab|> and <n> literal", "<|blank_4|>x", "<image_5>", "<0x41>",
         # special-token strings
         "[gMASK]<sop> text", "hello <eop> world", "<eop>", "a<unk>b", "<pad>x", "[MASK] fill",
         "[sMASK]</s><s>", "[gMASK]", "x [gMASK] y", "<sop>你好"]
PAIRS = [("你好", "我是"), ("hello world", "the answer\n你好")]
HISTORY = [("你好", "你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。"),
           ("介绍一下清华大学", "清华大学是 1911 年创建的。")]
QUERY = "晚上睡不着怎么办"
ANSWER = "先放松，再试试。"
REGISTERED = ("<sop>", "<eop>", "<unk>", "<pad>", "[MASK]")  # matched in text by the official code
OTHER_CONTROL = ("[gMASK]", "[sMASK]", "</s>", "<s>")  # plain text for the official code, matched here


def prompt_of(query, history):
    """ChatGLM-6B's chat()/stream_chat() prompt (and ptuning/main.py's, when it has a history)."""
    if not history:
        return query
    prompt = ""
    for i, (old_query, response) in enumerate(history):
        prompt += f"[Round {i}]\n问：{old_query}\n答：{response}\n"
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


# ---------------------------------------------------------------- the official ids (see the module docstring)

OFFICIAL = {
    'unigram': {
        'encode': [
            [50, 52, 232, 235],
            [54, 55, 14, 232, 235],
            [5, 106, 6, 107, 14, 232, 235],
            [5, 240, 90, 83, 79, 82, 65, 147, 232, 235],
            [149, 240, 232, 235],
            [149, 232, 235],
            [5, 90, 83, 79, 82, 232, 235],
            [56, 240, 80, 241, 81, 232, 235],
            [78, 9, 4, 135, 12, 4, 4, 135, 13, 232, 235],
            [5, 239, 165, 239, 97, 83, 94, 232, 235],
            [66, 67, 68, 4, 242, 69, 70, 51, 52, 71, 239, 38, 73, 232, 235],
            [142, 5, 559, 478, 471, 447, 559, 478, 461, 456, 232, 235],
            [141, 5, 9, 12, 13, 16, 17, 18, 19, 5, 12, 8, 12, 16, 232, 235],
            [140, 5, 117, 139, 5, 9, 12, 13, 232, 235],
            [232, 235],
            [232, 235],
            [5, 4, 232, 235],
            [5, 102, 318, 243, 103, 232, 235],
            [5, 318, 232, 235],
            [56, 5, 80, 5, 548, 452, 487, 551, 486, 465, 10, 156, 232, 235],
            [58, 59, 150, 5, 6, 62, 33, 98, 143, 5, 15, 232, 235],
            [50, 5, 7, 52, 5, 6, 5, 93, 89, 5, 14, 63, 5, 61, 232, 235],
            [5, 239, 56, 92, 82, 5, 4, 5, 90, 87, 98, 83, 96, 79, 90, 232, 235],
            [5, 242, 102, 232, 235],
            [5, 28, 163, 32, 17, 29, 232, 235],
            [5, 28, 8, 102, 16, 9, 29, 232, 235],
            [26, 85, 77, 27, 235, 138, 232, 235],
            [50, 236, 52, 232, 235],
            [236, 232, 235],
            [56, 0, 5, 80, 232, 235],
            [3, 5, 102, 232, 235],
            [231, 5, 156, 90, 90, 232, 235],
            [26, 97, 77, 27, 28, 31, 97, 29, 28, 97, 29, 232, 235],
            [26, 85, 77, 27, 232, 235],
            [5, 102, 26, 85, 77, 27, 5, 103, 232, 235],
            [235, 5, 106, 232, 235],
        ],
        'decode': {
            2: '你好,世界!',
            5: 'trailing',
            6: 'lead',
            15: '',
            18: '                                                                                ',
            19: 'a b 全角:fi',
            20: "I'm fine, don't you?",
            21: "hello. world, ok! it's",
            22: '\t and \n literal',
            23: '    x',
            26: '[gMASK] text',
            27: 'hello world',
            28: '',
            29: 'a b',
            30: 'x',
            31: 'fill',
            35: '你好',
        },
        'pairs': [
            [5, 106, 232, 235, 5, 112, 236],
            [50, 52, 232, 235, 49, 153, 4, 106, 236],
        ],
        'chat': [
            [5, 129, 132, 202, 232, 235],
            [26, 74, 5, 8, 27, 4, 115, 10, 106, 4, 116, 10, 106, 559, 478, 464, 458, 14, 112, 207, 208,
              75, 76, 187, 11, 18, 176, 6, 209, 210, 211, 108, 6, 212, 115, 113, 213, 214, 105, 4, 25,
              74, 5, 9, 27, 4, 115, 10, 218, 219, 216, 217, 4, 116, 10, 216, 217, 114, 5, 9, 21, 9, 9, 5,
              222, 223, 128, 105, 4, 25, 74, 5, 12, 27, 4, 115, 10, 129, 132, 202, 4, 116, 10, 232, 235],
        ],
        'train': [26, 74, 5, 8, 27, 4, 115, 10, 106, 4, 116, 10, 106, 559, 478, 464, 458, 14, 112, 207, 208, 75,
          76, 187, 11, 18, 176, 6, 209, 210, 211, 108, 6, 212, 115, 113, 213, 214, 105, 4, 25, 74, 5, 9,
          27, 4, 115, 10, 218, 219, 216, 217, 4, 116, 10, 216, 217, 114, 5, 9, 21, 9, 9, 5, 222, 223,
          128, 105, 4, 25, 74, 5, 12, 27, 4, 115, 10, 129, 132, 202, 4, 116, 10, 232, 235, 5, 548, 452,
          455, 549, 467, 509, 549, 476, 509, 6, 548, 453, 460, 551, 494, 468, 551, 494, 468, 105, 236],
        'train_context': 84,
        'batch': [
            [5, 86, 87, 232, 235],
            [3, 50, 52, 232, 235],
        ],
        'decodes': {
            'bos_ws_twice': ([5, 5, 4], '\n'),
            'specials_first': ([232, 235, 5, 240], '  '),
            'eop_mid': ([4, 236, 0, 3, 2], '\n'),
        },
    },
    'bpe': {
        'encode': [
            [12, 21, 396, 399],
            [30, 35, 247, 396, 399],
            [238, 208, 239, 209, 247, 396, 399],
            [238, 404, 284, 283, 291, 288, 52, 134, 396, 399],
            [147, 404, 396, 399],
            [147, 396, 399],
            [137, 396, 399],
            [36, 404, 309, 405, 314, 396, 399],
            [91, 242, 4, 94, 245, 4, 4, 94, 246, 396, 399],
            [238, 403, 191, 403, 293, 283, 299, 396, 399],
            [54, 58, 60, 4, 406, 64, 65, 16, 21, 66, 403, 270, 75, 396, 399],
            [121, 238, 723, 642, 635, 611, 723, 642, 625, 620, 396, 399],
            [117, 238, 242, 245, 246, 249, 250, 251, 252, 238, 245, 241, 245, 249, 396, 399],
            [112, 238, 211, 108, 238, 242, 245, 246, 396, 399],
            [396, 399],
            [396, 399],
            [238, 4, 396, 399],
            [128, 482, 407, 313, 396, 399],
            [238, 482, 396, 399],
            [36, 238, 309, 238, 712, 616, 651, 715, 650, 629, 243, 170, 396, 399],
            [39, 40, 151, 238, 239, 45, 42, 124, 238, 248, 396, 399],
            [12, 238, 240, 21, 238, 239, 152, 316, 238, 247, 47, 238, 43, 396, 399],
            [238, 403, 162, 288, 238, 4, 89, 281, 283, 287, 291, 284, 396, 399],
            [238, 406, 310, 396, 399],
            [192, 185, 264, 250, 261, 396, 399],
            [192, 241, 310, 249, 242, 261, 396, 399],
            [238, 258, 297, 87, 259, 399, 101, 396, 399],
            [12, 400, 21, 396, 399],
            [400, 396, 399],
            [36, 0, 238, 309, 396, 399],
            [3, 128, 396, 399],
            [395, 149, 284, 284, 396, 399],
            [238, 258, 293, 87, 259, 260, 263, 293, 261, 260, 293, 261, 396, 399],
            [238, 258, 297, 87, 259, 396, 399],
            [128, 238, 258, 297, 87, 259, 122, 396, 399],
            [399, 238, 208, 396, 399],
        ],
        'decode': {
            2: '你好,世界!',
            5: 'trailing',
            6: 'lead',
            15: '',
            18: '                                                                                ',
            19: 'a b 全角:fi',
            20: "I'm fine, don't you?",
            21: "hello. world, ok! it's",
            22: '\t and \n literal',
            23: '    x',
            26: '[gMASK] text',
            27: 'hello world',
            28: '',
            29: 'a b',
            30: 'x',
            31: 'fill',
            35: '你好',
        },
        'pairs': [
            [238, 208, 396, 399, 238, 210, 400],
            [12, 21, 396, 399, 7, 166, 4, 208, 400],
        ],
        'chat': [
            [238, 215, 217, 219, 396, 399],
            [238, 258, 79, 238, 241, 259, 4, 340, 243, 208, 4, 341, 243, 208, 723, 642, 628, 622, 247,
              210, 222, 223, 83, 84, 305, 244, 251, 318, 239, 364, 224, 225, 334, 239, 226, 340, 338,
              227, 228, 333, 4, 258, 79, 238, 242, 259, 4, 340, 243, 231, 232, 229, 230, 4, 341, 243,
              229, 230, 339, 238, 242, 254, 242, 242, 238, 382, 233, 349, 333, 4, 258, 79, 238, 245, 259,
              4, 340, 243, 215, 217, 219, 4, 341, 243, 396, 399],
        ],
        'train': [238, 258, 79, 238, 241, 259, 4, 340, 243, 208, 4, 341, 243, 208, 723, 642, 628, 622, 247, 210,
          222, 223, 83, 84, 305, 244, 251, 318, 239, 364, 224, 225, 334, 239, 226, 340, 338, 227, 228,
          333, 4, 258, 79, 238, 242, 259, 4, 340, 243, 231, 232, 229, 230, 4, 341, 243, 229, 230, 339,
          238, 242, 254, 242, 242, 238, 382, 233, 349, 333, 4, 258, 79, 238, 245, 259, 4, 340, 243, 215,
          217, 219, 4, 341, 243, 396, 399, 238, 712, 616, 619, 713, 631, 673, 713, 640, 673, 239, 712,
          617, 624, 715, 658, 632, 715, 658, 632, 333, 400],
        'train_context': 85,
        'batch': [
            [8, 292, 396, 399],
            [12, 21, 396, 399],
        ],
        'decodes': {
            'bos_ws_twice': ([238, 238, 4], '\n'),
            'specials_first': ([396, 399, 238, 404], '  '),
            'eop_mid': ([4, 400, 0, 3, 2], '\n'),
        },
    },
    'image20000': {
        'encode': [
            [20050, 20052, 20232, 20235],
            [20054, 20055, 20014, 20232, 20235],
            [20005, 20106, 20006, 20107, 20014, 20232, 20235],
            [20005, 20240, 20090, 20083, 20079, 20082, 20065, 20147, 20232, 20235],
            [20149, 20240, 20232, 20235],
            [20149, 20232, 20235],
            [20005, 20090, 20083, 20079, 20082, 20232, 20235],
            [20056, 20240, 20080, 20241, 20081, 20232, 20235],
            [20078, 20009, 20004, 20135, 20012, 20004, 20004, 20135, 20013, 20232, 20235],
            [20005, 20239, 20165, 20239, 20097, 20083, 20094, 20232, 20235],
            [20066, 20067, 20068, 20004, 20242, 20069, 20070, 20051, 20052, 20071, 20239, 20038, 20073,
              20232, 20235],
            [20142, 20005, 20559, 20478, 20471, 20447, 20559, 20478, 20461, 20456, 20232, 20235],
            [20141, 20005, 20009, 20012, 20013, 20016, 20017, 20018, 20019, 20005, 20012, 20008, 20012,
              20016, 20232, 20235],
            [20140, 20005, 20117, 20139, 20005, 20009, 20012, 20013, 20232, 20235],
            [20232, 20235],
            [20232, 20235],
            [20005, 20004, 20232, 20235],
            [20005, 20102, 20318, 20243, 20103, 20232, 20235],
            [20005, 20318, 20232, 20235],
            [20056, 20005, 20080, 20005, 20548, 20452, 20487, 20551, 20486, 20465, 20010, 20156, 20232,
              20235],
            [20058, 20059, 20150, 20005, 20006, 20062, 20033, 20098, 20143, 20005, 20015, 20232, 20235],
            [20050, 20005, 20007, 20052, 20005, 20006, 20005, 20093, 20089, 20005, 20014, 20063, 20005,
              20061, 20232, 20235],
            [20005, 20239, 20056, 20092, 20082, 20005, 20004, 20005, 20090, 20087, 20098, 20083, 20096,
              20079, 20090, 20232, 20235],
            [20005, 20242, 20102, 20232, 20235],
            [20005, 20028, 20163, 20032, 20017, 20029, 20232, 20235],
            [20005, 20028, 20008, 20102, 20016, 20009, 20029, 20232, 20235],
            [20026, 20085, 20077, 20027, 20235, 20138, 20232, 20235],
            [20050, 20236, 20052, 20232, 20235],
            [20236, 20232, 20235],
            [20056, 20000, 20005, 20080, 20232, 20235],
            [20003, 20005, 20102, 20232, 20235],
            [20231, 20005, 20156, 20090, 20090, 20232, 20235],
            [20026, 20097, 20077, 20027, 20028, 20031, 20097, 20029, 20028, 20097, 20029, 20232, 20235],
            [20026, 20085, 20077, 20027, 20232, 20235],
            [20005, 20102, 20026, 20085, 20077, 20027, 20005, 20103, 20232, 20235],
            [20235, 20005, 20106, 20232, 20235],
        ],
        'decode': {
            2: '你好,世界!',
            5: 'trailing',
            6: 'lead',
            15: '',
            18: '                                                                                ',
            19: 'a b 全角:fi',
            20: "I'm fine, don't you?",
            21: "hello. world, ok! it's",
            22: '\t and \n literal',
            23: '    x',
            26: '[gMASK] text',
            27: 'hello world',
            28: '',
            29: 'a b',
            30: 'x',
            31: 'fill',
            35: '你好',
        },
        'pairs': [
            [20005, 20106, 20232, 20235, 20005, 20112, 20236],
            [20050, 20052, 20232, 20235, 20049, 20153, 20004, 20106, 20236],
        ],
        'chat': [
            [20005, 20129, 20132, 20202, 20232, 20235],
            [20026, 20074, 20005, 20008, 20027, 20004, 20115, 20010, 20106, 20004, 20116, 20010, 20106,
              20559, 20478, 20464, 20458, 20014, 20112, 20207, 20208, 20075, 20076, 20187, 20011, 20018,
              20176, 20006, 20209, 20210, 20211, 20108, 20006, 20212, 20115, 20113, 20213, 20214, 20105,
              20004, 20025, 20074, 20005, 20009, 20027, 20004, 20115, 20010, 20218, 20219, 20216, 20217,
              20004, 20116, 20010, 20216, 20217, 20114, 20005, 20009, 20021, 20009, 20009, 20005, 20222,
              20223, 20128, 20105, 20004, 20025, 20074, 20005, 20012, 20027, 20004, 20115, 20010, 20129,
              20132, 20202, 20004, 20116, 20010, 20232, 20235],
        ],
    },
}

TWINS = {"unigram": ("unigram", 0), "bpe": ("bpe", 0), "image20000": ("unigram", None)}


@pytest.fixture(scope="module", params=list(TWINS))
def converted(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    folder = write_twin(base / "model", *TWINS[request.param])
    return request.param, convert_tokenizer(folder, base / "fast")


def ids_of(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def test_which_folders_are_chatglm6b(tmp_path):
    assert is_chatglm6b_tokenizer(write_twin(tmp_path / "v1"))
    v2 = tmp_path / "v2"  # ChatGLM2/3: the same class name, but tokenizer.model
    v2.mkdir()
    (v2 / "tokenizer.model").write_bytes(b"\n")
    (v2 / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}))
    assert not is_chatglm6b_tokenizer(v2)
    other = write_twin(tmp_path / "llama")
    (other / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert not is_chatglm6b_tokenizer(other)
    (other / "tokenizer_config.json").unlink()
    assert not is_chatglm6b_tokenizer(other)
    auto_only = write_twin(tmp_path / "auto")
    config = json.loads((auto_only / "tokenizer_config.json").read_text())
    del config["tokenizer_class"]
    (auto_only / "tokenizer_config.json").write_text(json.dumps(config))
    assert is_chatglm6b_tokenizer(auto_only)  # auto_map names tokenization_chatglm.ChatGLMTokenizer


def test_texts_give_the_official_ids(converted):
    kind, tok = converted
    official = OFFICIAL[kind]["encode"]
    gmask, sop = ids_of(tok, "[gMASK]", "<sop>")
    for text, ids in zip(TEXTS, official):
        registered = any(s in text for s in REGISTERED)
        other = any(s in text for s in OTHER_CONTROL)
        if registered and other:
            continue  # below
        # Control-token strings the official code leaves as text: as text with split_special_tokens=True.
        split = other
        assert tok(text, split_special_tokens=split)["input_ids"] == ids, (kind, text)
        assert tok(text, add_special_tokens=False, split_special_tokens=split)["input_ids"] == ids[:-2], (kind, text)
        assert ids[-2:] == [gmask, sop]
        if other:  # matched by default, so that a rendered template gives control tokens
            default = tok(text, add_special_tokens=False)["input_ids"]
            assert all(tok.convert_tokens_to_ids(s) in default for s in OTHER_CONTROL if s in text), (kind, text)


def test_a_rendered_template_prefix_tokenizes_to_control_ids(converted):
    kind, tok = converted
    text = "[gMASK]<sop> text"
    official = OFFICIAL[kind]["encode"][TEXTS.index(text)]  # [gMASK] as text, <sop> matched, " text" after it
    gmask, sop = ids_of(tok, "[gMASK]", "<sop>")
    assert sop in official and gmask not in official[:-2]
    assert tok(text, add_special_tokens=False)["input_ids"] == [gmask] + official[official.index(sop):-2]


def test_decode_gives_the_official_text(converted):
    kind, tok = converted
    decoded = OFFICIAL[kind]["decode"]
    for i, (text, ids) in enumerate(zip(TEXTS, OFFICIAL[kind]["encode"])):
        assert tok.decode(ids, skip_special_tokens=True) == decoded.get(i, text), (kind, text)
    if "decodes" not in OFFICIAL[kind]:
        return
    for name, (ids, text) in OFFICIAL[kind]["decodes"].items():
        assert tok.decode(ids, skip_special_tokens=True) == text, name
    # what chat() decodes: the answer ids, then process_response (not part of the tokenizer)
    train = OFFICIAL[kind]["train"]
    assert tok.decode(train[OFFICIAL[kind]["train_context"]:], skip_special_tokens=True) == "先放松,再试试。"


def test_pairs_chat_prompts_and_the_ptuning_layout(converted):
    kind, tok = converted
    official = OFFICIAL[kind]
    for (a, b), ids in zip(PAIRS, official["pairs"]):
        assert tok(a, b)["input_ids"] == ids
        a_ids = tok(a, add_special_tokens=False)["input_ids"]
        b_ids = tok(b, add_special_tokens=False)["input_ids"]
        assert ids == a_ids + ids_of(tok, "[gMASK]", "<sop>") + b_ids + [tok.eos_token_id]
    assert [tok([prompt_of(QUERY, h)])["input_ids"][0] for h in ([], HISTORY)] == official["chat"]
    if "train" in official:
        ids = tok(prompt_of(QUERY, HISTORY), ANSWER)["input_ids"]
        assert ids == official["train"]
        assert ids.index(tok.bos_token_id) == official["train_context"]


def test_special_tokens_eos_pad_and_padding(converted):
    kind, tok = converted
    n = len(ice_pieces(TWINS[kind][0]))
    offset = 20000 if TWINS[kind][1] is None else 0
    first = offset + n - 344  # the layout of the real model: 130000 = 130344 - 344
    assert ids_of(tok, *SPECIALS) == list(range(first, first + 8))
    assert ids_of(tok, "<unk>", "<s>", "</s>", "<pad>", "<n>", "<|tab|>", "<|blank_2|>", "<|blank_80|>", "<0x00>") \
        == [offset + i for i in (0, 1, 2, 3, 4)] + [first + 8, first + 9, first + 87, first + 88]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token, tok.mask_token) == \
        ("<sop>", "<eop>", "<pad>", "<unk>", "[MASK]")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (first + 4, first + 5, offset + 3)
    assert {"[gMASK]", "[sMASK]", "<dBLOCK>"} <= set(tok.all_special_tokens)
    assert tok.padding_side == "left" and len(tok) == offset + n
    assert "token_type_ids" not in tok("hi")
    if "batch" in OFFICIAL[kind]:
        assert tok(["hi", "hello world"], padding=True)["input_ids"] == OFFICIAL[kind]["batch"]
    if offset:
        assert tok.convert_ids_to_tokens([0, 19999]) == ["<image_0>", "<image_19999>"]


def test_saved_files_and_reload(tmp_path):
    from transformers import AutoTokenizer

    folder = write_twin(tmp_path / "model")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}[gMASK]<sop>"
    tok = convert_tokenizer(folder, tmp_path / "fast", chat_template=template)
    config = json.loads((tmp_path / "fast" / "tokenizer_config.json").read_text())
    assert config["chattune_glm_family"] == "chatglm6b" and config["padding_side"] == "left"
    assert config["clean_up_tokenization_spaces"] is True  # the official decode cleans up (" ," -> ",")
    special = json.loads((tmp_path / "fast" / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<eop>" and "[gMASK]" in special["additional_special_tokens"]
    assert (tmp_path / "fast" / "tokenizer.json").is_file() and not (tmp_path / "fast" / "ice_text.model").exists()
    again = AutoTokenizer.from_pretrained(str(tmp_path / "fast"))
    built = build_fast_tokenizer(folder)
    for text, ids in zip(TEXTS, OFFICIAL["unigram"]["encode"]):
        assert again(text)["input_ids"] == built(text)["input_ids"] == tok(text)["input_ids"]
        assert again.decode(ids, skip_special_tokens=True) == built.decode(ids, skip_special_tokens=True)
    # the template rendered to text, "[gMASK]<sop>" included, gives chat()'s ids for a first question
    ids = again.apply_chat_template([{"role": "user", "content": QUERY}], tokenize=True, add_special_tokens=False,
                                    return_dict=False)
    assert list(ids) == OFFICIAL["unigram"]["chat"][0]


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_needs_neither_sentencepiece_nor_protobuf(tmp_path, monkeypatch, kind):
    for name in ("sentencepiece", "google.protobuf"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them now raises ImportError
    tok = build_fast_tokenizer(write_twin(tmp_path / "model", *TWINS[kind]))
    plain = TEXTS.index("<|tab|> and <n> literal") + 1
    assert [tok(t)["input_ids"] for t in TEXTS[:plain]] == OFFICIAL[kind]["encode"][:plain]


def _config(folder, **changes):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_clear_errors(tmp_path):
    folder = write_twin(tmp_path / "missing")
    (folder / "ice_text.model").unlink()
    with pytest.raises(ConfigError, match=r"no ice_text.model.*put the published ice_text.model"):
        build_fast_tokenizer(folder)

    folder = write_twin(tmp_path / "lfs")
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:5e974d9a\nsize 2706249\n"
    (folder / "ice_text.model").write_text(pointer)
    with pytest.raises(ConfigError, match=r"git-lfs pointer.*git lfs pull"):
        build_fast_tokenizer(folder)

    pieces = [p for p in ice_pieces() if p[0] != "[gMASK]"]  # the official code would map [gMASK] to <unk>
    with pytest.raises(ConfigError, match=r"ice_text.model: no piece '\[gMASK\]'"):
        build_fast_tokenizer(write_twin(tmp_path / "no_gmask", pieces=pieces))

    pieces = [(p, s, USER_DEFINED if p == "<sop>" else t) for p, s, t in ice_pieces()]
    with pytest.raises(ConfigError, match=r"\['<sop>'\] are not control pieces"):
        build_fast_tokenizer(write_twin(tmp_path / "ud_sop", pieces=pieces))

    folder = write_twin(tmp_path / "offset")  # config.json for num_image_tokens 0 ...
    _config(folder, num_image_tokens=20000)  # ... but the tokenizer would offset every id by 20000
    with pytest.raises(ConfigError, match=r"config.json: bos_token_id is 235, but '<sop>' is piece 235 .* id 20235"
                                          r".*Fix num_image_tokens in tokenizer_config.json"):
        build_fast_tokenizer(folder)

    folder = write_twin(tmp_path / "lower")
    _config(folder, do_lower_case=True)
    with pytest.raises(ConfigError, match="do_lower_case is true"):
        build_fast_tokenizer(folder)

    folder = write_twin(tmp_path / "bytes")
    (folder / "ice_text.model").write_bytes(b"\x0f\x01")
    with pytest.raises(ConfigError, match="ice_text.model"):
        build_fast_tokenizer(folder)
