"""ChatGLM2/3 and GLM-4 tokenizers converted to fast tokenizers give the publishers' ids, and chattune's templates
render their chat formats exactly.

The real tokenizer files are hub LFS files, so the tests build tiny twins (below, deterministic, nothing
downloaded): a 517-piece SentencePiece BPE model with ChatGLM2/3's settings (byte fallback with <0x00>..<0xFF>,
identity normalizer, dummy prefix, whitespace kept; merges that build English, Chinese and whitespace pieces) and
a 335-token tiktoken file (256 byte ranks + merges incl. Chinese characters built byte by byte), each with a
tokenizer_config.json laid out as the publisher's.

How the OFFICIAL numbers were produced (once, outside the repository, /tmp/ref): the publishers'
`tokenization_chatglm.py` run on these twins in a venv with transformers 4.44.2, sentencepiece 0.2.3,
tiktoken 0.14.0, torch 2.13.0 (CPU), Python 3.11:
- ChatGLM2-6B: github bq-xiao/chatglm2-6b-model, commit 87b7044f4e6dc4b43716bfed329b04be45dd62d7
  ("同步chatglm2-6b代码", a copy of THUDM/chatglm2-6b), tokenization_chatglm.py, unpatched;
- ChatGLM3-6B: github czk1997/chatglm3-copy, commit 456aa875cf1f46623006edaa23103774ea9c0eae (THUDM/chatglm3-6b's
  history up to "fix piece id out of range (#20)"), tokenization_chatglm.py, unpatched;
- GLM-4-9B-chat: github zhaoyukoon/damoxing_fenci_gongji, commit dd7b1374d44149231421b74bbeadc63840d166d7,
  glm-4-9b-chat/tokenization_chatglm.py, with its two local additions removed (a debug print of every vocab line
  and a module-level instantiation); chat rendered by the chat_template of glm-4-9b-chat's tokenizer_config.json
  (only its `function` tool branch, the one used here).
texts: `encode(text)` and `encode(text, add_special_tokens=False)`. chatglm2: `tokenizer([build_prompt(q, history)])`
(chat) and ptuning/main.py's `encode(prompt) + encode(answer, add_special_tokens=False) + [eos]` (train).
chatglm3: `build_chat_input(query, history)` with a tools system message, a tool call (metadata) and an
observation (chat); prefix + `build_single_message` per message + eos, as its finetune demo (train).
glm4: `apply_chat_template(messages, add_generation_prompt=True)` with tools (chat); [gMASK] <sop> + each
message's `apply_chat_template([m])[2:]` + `<|user|>`, as GLM-4's finetune_demo process_batch (train).
content_data: a user message whose text holds special-token strings, the way the official code encodes message
content (ChatGLM3/GLM-4 `build_single_message`, ChatGLM2 SentencePiece), i.e. as data.
"""

import json

import pytest

from chattune.data.encode import encode_conversation, encode_prompt
from chattune.data.formats import Conversation, Message
from chattune.data.templates import get_template
from chattune.errors import DataError
from chattune.models.families.glm_tokenizer import PREFIX, convert_tokenizer, glm_tokenizer_kind

# --- twins: pure-stdlib builders of the tiny ChatGLM2/3 and GLM-4 tokenizer files (copied verbatim into the test)
import base64
from pathlib import Path

NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


from protobuf_twin import _field  # noqa: E402 - the wire format the twins share


SP_WORDS = ["▁hello", "▁world", "▁the", "▁is", "▁a", "ing", "▁test", "hello", "llo", "▁Hello", "▁World", "▁in",
            "▁你好", "你好", "世界", "▁中文", "▁问", "▁用户", "工具", "▁北京", "天气", "▁12", "34", "▁2024", "▁▁",
            "▁▁▁▁", "<|", "|>", "▁line", "▁tab", "▁end", "▁text", "▁English", "▁mixed", "▁digits", "▁emoji",
            "▁sop", "▁weather", "get", "_weather", "▁call", "python", "▁temp", "▁city", "user", "▁user", "▁hi",
            "ML", "▁can", "▁you"]


def sp_pieces() -> list[tuple[str, float, int]]:
    """A SentencePiece BPE vocab in the real model's layout: <unk> <s> </s>, the 256 byte pieces, merged pieces
    (score = -rank, every one reachable by merging two shorter pieces), then the single characters."""
    merged: list[str] = []
    for word in SP_WORDS:  # each word's left-to-right prefixes: "▁h" "▁he" ... so every piece has a merge
        for end in range(2, len(word) + 1):
            if word[:end] not in merged:
                merged.append(word[:end])
    chars = sorted({c for w in SP_WORDS for c in w} | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
                   | set("0123456789,.!?:;'\"()[]{}<>|/_-=+*#@&%$`~") | set("你好世界中文问答用户工具天气今北京的是，。：？！"))
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    pieces += [(p, -float(i), NORMAL) for i, p in enumerate(merged)]
    pieces += [(c, -float(len(merged) + i), NORMAL) for i, c in enumerate(chars) if c not in merged]
    return pieces


def sp_model_bytes(remove_extra_whitespaces: bool = False) -> bytes:
    """The twin tokenizer.model: ChatGLM's settings (BPE, byte fallback, identity normalizer, dummy prefix,
    whitespace kept)."""
    pieces = sp_pieces()
    body = b"".join(_field(1, _field(1, p) + _field(2, s) + _field(3, t)) for p, s, t in pieces)
    trainer = (_field(3, 2) + _field(4, len(pieces)) + _field(35, True) + _field(40, 0) + _field(41, 1)
               + _field(42, 2) + _field(43, -1))
    normalizer = (_field(1, "identity") + _field(3, True) + _field(4, remove_extra_whitespaces) + _field(5, True))
    return body + _field(2, trainer) + _field(3, normalizer)


TT_WORDS = [b"he", b"ll", b"hel", b"hell", b"hello", b" h", b" he", b" hello", b"llo", b" w", b" wo", b"or",
            b" wor", b" world", b"in", b"ing", b" t", b" th", b" the", b"  ", b"    ", b"\n\n", b" \n", b"12",
            b"123", b"20", b"202", b" u", b"us", b"user", b"<|", b"|>", b"get", b"_w", b"_we", b"ea", b"_wea",
            b"ther", b"th", b"the", b"_weather", b"Hello", b"He", b"Hel", b"Hell"]


def tiktoken_ranks() -> list[bytes]:
    """GLM-4 twin ranks: all 256 single bytes, then merges (each the join of two earlier tokens), incl. UTF-8
    Chinese characters built byte by byte."""
    ranks = [bytes([b]) for b in range(256)]
    extra = list(TT_WORDS)
    for word in ["你好", "世界", "中文", "用户", "工具", "北京", "天气"]:
        data = word.encode()
        extra += [data[:end] for end in range(2, len(data) + 1)]
    for token in extra:
        if token not in ranks:
            ranks.append(token)
    return ranks


def tiktoken_text() -> str:
    return "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tiktoken_ranks()))


GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>"]


def write_twin(folder, kind: str, chat_template: str | None = None) -> Path:
    """A model folder as published, minus the weights and the remote code: tokenizer file, tokenizer_config.json
    (class, auto_map, special tokens laid out as the publisher's) and config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    auto_map = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    if kind == "glm4":
        (folder / "tokenizer.model").write_text(tiktoken_text())
        n = len(tiktoken_ranks())
        config = {"tokenizer_class": "ChatGLM4Tokenizer", "clean_up_tokenization_spaces": False,
                  "do_lower_case": False, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                  "model_max_length": 128000, "padding_side": "left", "remove_space": False,
                  "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
                  "added_tokens_decoder": {str(n + i): {"content": t, "lstrip": False, "normalized": False,
                                                        "rstrip": False, "single_word": False, "special": True}
                                           for i, t in enumerate(GLM4_SPECIALS)},
                  "additional_special_tokens": GLM4_SPECIALS[1:]}
    else:
        (folder / "tokenizer.model").write_bytes(sp_model_bytes())
        config = {"tokenizer_class": "ChatGLMTokenizer", "auto_map": auto_map, "remove_space": False,
                  "do_lower_case": False, "name_or_path": f"THUDM/{kind}-6b"}
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    (folder / "config.json").write_text(json.dumps({"model_type": "chatglm", "_name_or_path": f"THUDM/{kind}"}))
    return folder
# --- end twins


# ---------------------------------------------------------------- the official ids (see the module docstring)

OFFICIAL = {'chatglm2': {'texts': {'hello world': ([518, 520, 263, 268], [263, 268]),
                        'Hello World!': ([518, 520, 290, 295, 400], [290, 295, 400]),
                        '你好，世界': ([518, 520, 298, 514, 300], [298, 514, 300]),
                        '  leading spaces': ([518, 520, 318, 473, 466, 462, 465, 276, 355, 477, 462, 464, 466, 480],
                                             [318, 473, 466, 462, 465, 276, 355, 477, 462, 464, 466, 480]),
                        'trailing  ': ([518, 520, 269, 479, 462, 470, 473, 276, 317],
                                       [269, 479, 462, 470, 473, 276, 317]),
                        'a  b   c': ([518, 520, 274, 317, 463, 318, 464], [274, 317, 463, 318, 464]),
                        'line1\nline2\n\nline3': ([518, 520, 325, 416, 13, 473, 275, 466, 417, 13, 13, 473, 275,
                                                   466, 418],
                                                  [325, 416, 13, 473, 275, 466, 417, 13, 13, 473, 275, 466, 418]),
                        '\ttab\tsep': ([518, 520, 492, 12, 481, 462, 463, 12, 480, 466, 477],
                                       [492, 12, 481, 462, 463, 12, 480, 466, 477]),
                        'emoji 😀🎉': ([518, 520, 354, 492, 243, 162, 155, 131, 243, 162, 145, 140],
                                     [354, 492, 243, 162, 155, 131, 243, 162, 145, 140]),
                        'digits 1234567 2024': ([518, 520, 350, 311, 312, 420, 421, 422, 316],
                                                [350, 311, 312, 420, 421, 422, 316]),
                        'mixed 中文 English 123': ([518, 520, 344, 302, 339, 311, 418], [344, 302, 339, 311, 418]),
                        '': ([518, 520], []),
                        ' ': ([518, 520, 317], [317]),
                        '\n': ([518, 520, 492, 13], [492, 13]),
                        '<|user|>hi': ([518, 520, 492, 320, 389, 321, 469, 470], [492, 320, 389, 321, 469, 470]),
                        '[gMASK]sop text': ([518, 520, 492, 458, 468, 444, 432, 450, 442, 459, 480, 476, 477, 332],
                                            [492, 458, 468, 444, 432, 450, 442, 459, 480, 476, 477, 332]),
                        '</s> end': ([518, 520, 492, 427, 414, 480, 429, 330], [492, 427, 414, 480, 429, 330]),
                        '<unk>': ([518, 520, 492, 427, 482, 475, 472, 429], [492, 427, 482, 475, 472, 429]),
                        '<|endoftext|>x': ([518, 520, 492, 320, 466, 475, 465, 476, 467, 481, 466, 485, 481, 321,
                                            485],
                                           [492, 320, 466, 475, 465, 476, 467, 481, 466, 485, 481, 321, 485]),
                        '<sop>y': ([518, 520, 492, 427, 480, 476, 477, 429, 486],
                                   [492, 427, 480, 476, 477, 429, 486]),
                        'hello<|assistant|>world': ([518, 520, 263, 320, 462, 480, 480, 470, 480, 481, 462, 475,
                                                     481, 321, 484, 476, 479, 473, 465],
                                                    [263, 320, 462, 480, 480, 470, 480, 481, 462, 475, 481, 321,
                                                     484, 476, 479, 473, 465]),
                        'get_weather用户 工具': ([518, 520, 492, 365, 372, 508, 504, 492, 306],
                                             [492, 365, 372, 508, 504, 492, 306])},
              'chat': [518, 520, 492, 458, 449, 476, 482, 475, 465, 310, 459, 13, 13, 512, 515, 299, 13, 13, 511,
                       515, 299, 513, 233, 139, 148, 506, 492, 434, 469, 462, 481, 438, 443, 444, 417, 13, 13, 458,
                       449, 476, 482, 475, 465, 313, 459, 13, 13, 512, 515, 283, 271, 479, 466, 13, 13, 511, 515,
                       469, 470, 399, 13, 13, 458, 449, 476, 482, 475, 465, 492, 418, 459, 13, 13, 512, 515, 500,
                       496, 309, 430, 13, 13, 511, 515],
              'train': [518, 520, 492, 458, 449, 476, 482, 475, 465, 310, 459, 13, 13, 512, 515, 299, 13, 13, 511,
                        515, 299, 513, 233, 139, 148, 506, 492, 434, 469, 462, 481, 438, 443, 444, 417, 13, 13, 458,
                        449, 476, 482, 475, 465, 313, 459, 13, 13, 512, 515, 283, 271, 479, 466, 13, 13, 511, 515,
                        469, 470, 399, 13, 13, 458, 449, 476, 482, 475, 465, 492, 418, 459, 13, 13, 512, 515, 500,
                        496, 309, 430, 13, 13, 511, 515, 308, 273, 314, 2],
              'content_data': [492, 320, 389, 321, 469, 470, 492, 458, 468, 444, 432, 450, 442, 459, 492, 427, 480,
                               476, 477, 429, 427, 414, 480, 429]},
 'chatglm3': {'texts': {'hello world': ([518, 520, 263, 268], [263, 268]),
                        'Hello World!': ([518, 520, 290, 295, 400], [290, 295, 400]),
                        '你好，世界': ([518, 520, 298, 514, 300], [298, 514, 300]),
                        '  leading spaces': ([518, 520, 318, 473, 466, 462, 465, 276, 355, 477, 462, 464, 466, 480],
                                             [318, 473, 466, 462, 465, 276, 355, 477, 462, 464, 466, 480]),
                        'trailing  ': ([518, 520, 269, 479, 462, 470, 473, 276, 317],
                                       [269, 479, 462, 470, 473, 276, 317]),
                        'a  b   c': ([518, 520, 274, 317, 463, 318, 464], [274, 317, 463, 318, 464]),
                        'line1\nline2\n\nline3': ([518, 520, 325, 416, 13, 473, 275, 466, 417, 13, 13, 473, 275,
                                                   466, 418],
                                                  [325, 416, 13, 473, 275, 466, 417, 13, 13, 473, 275, 466, 418]),
                        '\ttab\tsep': ([518, 520, 492, 12, 481, 462, 463, 12, 480, 466, 477],
                                       [492, 12, 481, 462, 463, 12, 480, 466, 477]),
                        'emoji 😀🎉': ([518, 520, 354, 492, 243, 162, 155, 131, 243, 162, 145, 140],
                                     [354, 492, 243, 162, 155, 131, 243, 162, 145, 140]),
                        'digits 1234567 2024': ([518, 520, 350, 311, 312, 420, 421, 422, 316],
                                                [350, 311, 312, 420, 421, 422, 316]),
                        'mixed 中文 English 123': ([518, 520, 344, 302, 339, 311, 418], [344, 302, 339, 311, 418]),
                        '': ([518, 520], []),
                        ' ': ([518, 520, 317], [317]),
                        '\n': ([518, 520, 492, 13], [492, 13]),
                        '<|user|>hi': ([518, 520, 492, 320, 389, 321, 469, 470], [492, 320, 389, 321, 469, 470]),
                        '[gMASK]sop text': ([518, 520, 492, 458, 468, 444, 432, 450, 442, 459, 480, 476, 477, 332],
                                            [492, 458, 468, 444, 432, 450, 442, 459, 480, 476, 477, 332]),
                        '</s> end': ([518, 520, 492, 427, 414, 480, 429, 330], [492, 427, 414, 480, 429, 330]),
                        '<unk>': ([518, 520, 492, 427, 482, 475, 472, 429], [492, 427, 482, 475, 472, 429]),
                        '<|endoftext|>x': ([518, 520, 492, 320, 466, 475, 465, 476, 467, 481, 466, 485, 481, 321,
                                            485],
                                           [492, 320, 466, 475, 465, 476, 467, 481, 466, 485, 481, 321, 485]),
                        '<sop>y': ([518, 520, 492, 427, 480, 476, 477, 429, 486],
                                   [492, 427, 480, 476, 477, 429, 486]),
                        'hello<|assistant|>world': ([518, 520, 263, 320, 462, 480, 480, 470, 480, 481, 462, 475,
                                                     481, 321, 484, 476, 479, 473, 465],
                                                    [263, 320, 462, 480, 480, 470, 480, 481, 462, 475, 481, 321,
                                                     484, 476, 479, 473, 465]),
                        'get_weather用户 工具': ([518, 520, 492, 365, 372, 508, 504, 492, 306],
                                             [492, 365, 372, 508, 504, 492, 306])},
              'chat': [518, 520, 522, 492, 13, 492, 432, 475, 480, 484, 466, 479, 271, 492, 467, 476, 285, 484, 276,
                       492, 478, 482, 466, 480, 481, 470, 476, 475, 480, 274, 480, 492, 463, 466, 480, 481, 274,
                       480, 399, 396, 413, 492, 456, 476, 482, 259, 462, 483, 466, 274, 464, 464, 466, 480, 480,
                       269, 476, 271, 492, 467, 476, 285, 484, 276, 269, 476, 476, 473, 480, 425, 13, 458, 13, 319,
                       488, 13, 319, 319, 401, 475, 462, 474, 466, 401, 425, 492, 401, 365, 372, 401, 411, 13, 319,
                       319, 401, 465, 466, 480, 464, 479, 470, 477, 481, 470, 476, 475, 401, 425, 492, 401, 309,
                       492, 476, 467, 274, 386, 401, 411, 13, 319, 319, 401, 477, 462, 479, 462, 474, 466, 481, 466,
                       479, 480, 401, 425, 492, 488, 13, 319, 319, 319, 401, 481, 486, 477, 466, 401, 425, 492, 401,
                       476, 463, 471, 466, 464, 481, 401, 411, 13, 319, 319, 319, 401, 477, 479, 476, 477, 466, 479,
                       481, 470, 466, 480, 401, 425, 492, 488, 13, 319, 319, 319, 319, 401, 464, 470, 481, 486, 401,
                       425, 492, 488, 13, 319, 319, 319, 319, 319, 401, 481, 486, 477, 466, 401, 425, 492, 401, 480,
                       481, 479, 276, 401, 13, 319, 319, 319, 319, 490, 13, 319, 319, 319, 490, 411, 13, 319, 319,
                       319, 401, 479, 466, 478, 482, 470, 479, 466, 465, 401, 425, 492, 458, 13, 319, 319, 319, 319,
                       401, 464, 470, 481, 486, 401, 13, 319, 319, 319, 459, 13, 319, 319, 490, 13, 319, 490, 13,
                       459, 523, 492, 13, 308, 363, 430, 524, 492, 365, 372, 13, 492, 461, 461, 461, 381, 13, 481,
                       476, 476, 473, 460, 464, 462, 284, 407, 464, 470, 481, 486, 428, 406, 500, 496, 406, 408, 13,
                       461, 461, 461, 525, 492, 13, 492, 488, 401, 481, 466, 474, 477, 401, 425, 314, 490, 524, 492,
                       13, 308, 309, 273, 314, 523, 492, 13, 394, 271, 479, 466, 524],
              'train': [518, 520, 522, 492, 13, 492, 432, 475, 480, 484, 466, 479, 271, 492, 467, 476, 285, 484,
                        276, 492, 478, 482, 466, 480, 481, 470, 476, 475, 480, 274, 480, 492, 463, 466, 480, 481,
                        274, 480, 399, 396, 413, 492, 456, 476, 482, 259, 462, 483, 466, 274, 464, 464, 466, 480,
                        480, 269, 476, 271, 492, 467, 476, 285, 484, 276, 269, 476, 476, 473, 480, 425, 13, 458, 13,
                        319, 488, 13, 319, 319, 401, 475, 462, 474, 466, 401, 425, 492, 401, 365, 372, 401, 411, 13,
                        319, 319, 401, 465, 466, 480, 464, 479, 470, 477, 481, 470, 476, 475, 401, 425, 492, 401,
                        309, 492, 476, 467, 274, 386, 401, 411, 13, 319, 319, 401, 477, 462, 479, 462, 474, 466,
                        481, 466, 479, 480, 401, 425, 492, 488, 13, 319, 319, 319, 401, 481, 486, 477, 466, 401,
                        425, 492, 401, 476, 463, 471, 466, 464, 481, 401, 411, 13, 319, 319, 319, 401, 477, 479,
                        476, 477, 466, 479, 481, 470, 466, 480, 401, 425, 492, 488, 13, 319, 319, 319, 319, 401,
                        464, 470, 481, 486, 401, 425, 492, 488, 13, 319, 319, 319, 319, 319, 401, 481, 486, 477,
                        466, 401, 425, 492, 401, 480, 481, 479, 276, 401, 13, 319, 319, 319, 319, 490, 13, 319, 319,
                        319, 490, 411, 13, 319, 319, 319, 401, 479, 466, 478, 482, 470, 479, 466, 465, 401, 425,
                        492, 458, 13, 319, 319, 319, 319, 401, 464, 470, 481, 486, 401, 13, 319, 319, 319, 459, 13,
                        319, 319, 490, 13, 319, 490, 13, 459, 523, 492, 13, 308, 363, 430, 524, 492, 365, 372, 13,
                        492, 461, 461, 461, 381, 13, 481, 476, 476, 473, 460, 464, 462, 284, 407, 464, 470, 481,
                        486, 428, 406, 500, 496, 406, 408, 13, 461, 461, 461, 525, 492, 13, 492, 488, 401, 481, 466,
                        474, 477, 401, 425, 314, 490, 524, 492, 13, 308, 309, 273, 314, 523, 492, 13, 394, 271, 479,
                        466, 524, 492, 13, 263, 268, 2],
              'plain_system': [518, 520, 522, 492, 13, 492, 463, 466, 492, 463, 479, 470, 466, 467, 523, 492, 13,
                               394, 524],
              'content_data': [523, 492, 13, 492, 320, 389, 321, 469, 470, 492, 458, 468, 444, 432, 450, 442, 459,
                               492, 427, 480, 476, 477, 429, 427, 414, 480, 429]},
 'glm4': {'texts': {'hello world': ([337, 339, 260, 269], [260, 269]),
                    'Hello World!': ([337, 339, 297, 32, 87, 267, 108, 100, 33], [297, 32, 87, 267, 108, 100, 33]),
                    '你好，世界': ([337, 339, 305, 239, 188, 140, 310], [305, 239, 188, 140, 310]),
                    '  leading spaces': ([337, 339, 32, 32, 108, 291, 100, 271, 32, 115, 112, 97, 99, 101, 115],
                                         [32, 32, 108, 291, 100, 271, 32, 115, 112, 97, 99, 101, 115]),
                    'trailing  ': ([337, 339, 116, 114, 97, 105, 108, 271, 275],
                                   [116, 114, 97, 105, 108, 271, 275]),
                    'a  b   c': ([337, 339, 97, 32, 32, 98, 275, 32, 99], [97, 32, 32, 98, 275, 32, 99]),
                    'line1\nline2\n\nline3': ([337, 339, 108, 270, 101, 49, 10, 108, 270, 101, 50, 277, 108, 270,
                                               101, 51],
                                              [108, 270, 101, 49, 10, 108, 270, 101, 50, 277, 108, 270, 101, 51]),
                    '\ttab\tsep': ([337, 339, 9, 116, 97, 98, 9, 115, 101, 112],
                                   [9, 116, 97, 98, 9, 115, 101, 112]),
                    'emoji 😀🎉': ([337, 339, 101, 109, 111, 106, 105, 32, 240, 159, 152, 128, 240, 159, 142, 137],
                                 [101, 109, 111, 106, 105, 32, 240, 159, 152, 128, 240, 159, 142, 137]),
                    'digits 1234567 2024': ([337, 339, 100, 105, 103, 105, 116, 115, 32, 280, 52, 53, 54, 55, 32,
                                             282, 52],
                                            [100, 105, 103, 105, 116, 115, 32, 280, 52, 53, 54, 55, 32, 282, 52]),
                    'mixed 中文 English 123': ([337, 339, 109, 105, 120, 101, 100, 32, 314, 32, 69, 110, 103, 108,
                                              105, 115, 104, 32, 280],
                                             [109, 105, 120, 101, 100, 32, 314, 32, 69, 110, 103, 108, 105, 115,
                                              104, 32, 280]),
                    '': ([337, 339], []),
                    ' ': ([337, 339, 32], [32]),
                    '\n': ([337, 339, 10], [10]),
                    '<|user|>hi': ([337, 339, 342, 104, 105], [342, 104, 105]),
                    '[gMASK]sop text': ([337, 339, 337, 115, 111, 112, 272, 101, 120, 116],
                                        [337, 115, 111, 112, 272, 101, 120, 116]),
                    '</s> end': ([337, 339, 60, 47, 115, 62, 32, 101, 110, 100],
                                 [60, 47, 115, 62, 32, 101, 110, 100]),
                    '<unk>': ([337, 339, 60, 117, 110, 107, 62], [60, 117, 110, 107, 62]),
                    '<|endoftext|>x': ([337, 339, 335, 120], [335, 120]),
                    '<sop>y': ([337, 339, 339, 121], [339, 121]),
                    'hello<|assistant|>world': ([337, 339, 260, 343, 119, 267, 108, 100],
                                                [260, 343, 119, 267, 108, 100]),
                    'get_weather用户 工具': ([337, 339, 288, 296, 319, 32, 324], [288, 296, 319, 32, 324])},
          'chat': [337, 339, 341, 10, 302, 230, 152, 175, 306, 128, 306, 170, 229, 144, 141, 306, 186, 32, 67, 104,
                   97, 116, 71, 76, 77, 32, 231, 154, 132, 228, 186, 186, 321, 230, 153, 186, 232, 131, 189, 229,
                   138, 169, 230, 137, 139, 227, 128, 130, 302, 230, 152, 175, 229, 159, 186, 228, 186, 142, 230,
                   153, 186, 232, 176, 177, 65, 73, 232, 174, 173, 231, 187, 131, 231, 154, 132, 232, 175, 173, 232,
                   168, 128, 230, 168, 161, 229, 158, 139, 32, 71, 76, 77, 45, 52, 32, 230, 168, 161, 229, 158, 139,
                   229, 188, 128, 229, 143, 145, 231, 154, 132, 239, 188, 140, 302, 231, 154, 132, 228, 187, 187,
                   229, 138, 161, 230, 152, 175, 233, 146, 136, 229, 175, 185, 319, 231, 154, 132, 233, 151, 174,
                   233, 162, 152, 229, 146, 140, 232, 166, 129, 230, 177, 130, 230, 143, 144, 228, 190, 155, 233,
                   128, 130, 229, 189, 147, 231, 154, 132, 231, 173, 148, 330, 141, 229, 146, 140, 230, 148, 175,
                   230, 140, 129, 227, 128, 130, 277, 35, 32, 229, 143, 175, 316, 324, 10, 35, 35, 32, 103, 101,
                   116, 296, 277, 123, 10, 275, 32, 32, 34, 110, 97, 109, 101, 34, 58, 32, 34, 288, 296, 34, 44, 10,
                   275, 32, 32, 34, 100, 101, 115, 99, 114, 105, 112, 116, 105, 111, 110, 34, 58, 32, 34, 334, 32,
                   111, 102, 32, 97, 32, 99, 105, 116, 121, 34, 44, 10, 275, 32, 32, 34, 112, 97, 114, 97, 109, 101,
                   116, 101, 114, 115, 34, 58, 32, 123, 10, 276, 275, 32, 32, 34, 116, 121, 112, 101, 34, 58, 32,
                   34, 111, 98, 106, 101, 99, 116, 34, 44, 10, 276, 275, 32, 32, 34, 112, 114, 111, 112, 101, 114,
                   116, 105, 101, 115, 34, 58, 32, 123, 10, 276, 276, 275, 32, 32, 34, 99, 105, 116, 121, 34, 58,
                   32, 123, 10, 276, 276, 276, 275, 32, 32, 34, 116, 121, 112, 101, 34, 58, 32, 34, 115, 116, 114,
                   271, 34, 10, 276, 276, 275, 32, 32, 125, 10, 276, 275, 32, 32, 125, 44, 10, 276, 275, 32, 32, 34,
                   114, 101, 113, 117, 105, 114, 101, 100, 34, 58, 32, 91, 10, 276, 276, 275, 32, 32, 34, 99, 105,
                   116, 121, 34, 10, 276, 275, 32, 32, 93, 10, 275, 32, 32, 125, 10, 125, 10, 229, 156, 168, 232,
                   176, 131, 316, 306, 138, 232, 191, 176, 229, 135, 189, 230, 149, 176, 230, 151, 182, 239, 188,
                   140, 232, 175, 183, 301, 191, 316, 32, 74, 115, 111, 110, 32, 230, 160, 188, 229, 188, 143, 232,
                   161, 168, 231, 164, 186, 232, 176, 131, 316, 231, 154, 132, 229, 143, 130, 230, 149, 176, 227,
                   128, 130, 342, 10, 329, 265, 291, 293, 63, 343, 288, 296, 10, 123, 34, 99, 105, 116, 121, 34, 58,
                   32, 34, 329, 34, 125, 344, 10, 123, 34, 116, 101, 109, 112, 34, 58, 32, 281, 125, 343, 10, 329,
                   334, 32, 105, 115, 32, 281, 342, 10, 104, 105, 274, 114, 101, 343],
          'train': [337, 339, 341, 10, 302, 230, 152, 175, 306, 128, 306, 170, 229, 144, 141, 306, 186, 32, 67, 104,
                    97, 116, 71, 76, 77, 32, 231, 154, 132, 228, 186, 186, 321, 230, 153, 186, 232, 131, 189, 229,
                    138, 169, 230, 137, 139, 227, 128, 130, 302, 230, 152, 175, 229, 159, 186, 228, 186, 142, 230,
                    153, 186, 232, 176, 177, 65, 73, 232, 174, 173, 231, 187, 131, 231, 154, 132, 232, 175, 173,
                    232, 168, 128, 230, 168, 161, 229, 158, 139, 32, 71, 76, 77, 45, 52, 32, 230, 168, 161, 229,
                    158, 139, 229, 188, 128, 229, 143, 145, 231, 154, 132, 239, 188, 140, 302, 231, 154, 132, 228,
                    187, 187, 229, 138, 161, 230, 152, 175, 233, 146, 136, 229, 175, 185, 319, 231, 154, 132, 233,
                    151, 174, 233, 162, 152, 229, 146, 140, 232, 166, 129, 230, 177, 130, 230, 143, 144, 228, 190,
                    155, 233, 128, 130, 229, 189, 147, 231, 154, 132, 231, 173, 148, 330, 141, 229, 146, 140, 230,
                    148, 175, 230, 140, 129, 227, 128, 130, 277, 35, 32, 229, 143, 175, 316, 324, 10, 35, 35, 32,
                    103, 101, 116, 296, 277, 123, 10, 275, 32, 32, 34, 110, 97, 109, 101, 34, 58, 32, 34, 288, 296,
                    34, 44, 10, 275, 32, 32, 34, 100, 101, 115, 99, 114, 105, 112, 116, 105, 111, 110, 34, 58, 32,
                    34, 334, 32, 111, 102, 32, 97, 32, 99, 105, 116, 121, 34, 44, 10, 275, 32, 32, 34, 112, 97, 114,
                    97, 109, 101, 116, 101, 114, 115, 34, 58, 32, 123, 10, 276, 275, 32, 32, 34, 116, 121, 112, 101,
                    34, 58, 32, 34, 111, 98, 106, 101, 99, 116, 34, 44, 10, 276, 275, 32, 32, 34, 112, 114, 111,
                    112, 101, 114, 116, 105, 101, 115, 34, 58, 32, 123, 10, 276, 276, 275, 32, 32, 34, 99, 105, 116,
                    121, 34, 58, 32, 123, 10, 276, 276, 276, 275, 32, 32, 34, 116, 121, 112, 101, 34, 58, 32, 34,
                    115, 116, 114, 271, 34, 10, 276, 276, 275, 32, 32, 125, 10, 276, 275, 32, 32, 125, 44, 10, 276,
                    275, 32, 32, 34, 114, 101, 113, 117, 105, 114, 101, 100, 34, 58, 32, 91, 10, 276, 276, 275, 32,
                    32, 34, 99, 105, 116, 121, 34, 10, 276, 275, 32, 32, 93, 10, 275, 32, 32, 125, 10, 125, 10, 229,
                    156, 168, 232, 176, 131, 316, 306, 138, 232, 191, 176, 229, 135, 189, 230, 149, 176, 230, 151,
                    182, 239, 188, 140, 232, 175, 183, 301, 191, 316, 32, 74, 115, 111, 110, 32, 230, 160, 188, 229,
                    188, 143, 232, 161, 168, 231, 164, 186, 232, 176, 131, 316, 231, 154, 132, 229, 143, 130, 230,
                    149, 176, 227, 128, 130, 342, 10, 329, 265, 291, 293, 63, 343, 288, 296, 10, 123, 34, 99, 105,
                    116, 121, 34, 58, 32, 34, 329, 34, 125, 344, 10, 123, 34, 116, 101, 109, 112, 34, 58, 32, 281,
                    125, 343, 10, 329, 334, 32, 105, 115, 32, 281, 342, 10, 104, 105, 343, 10, 260, 269, 342],
          'content_data': [342, 10, 286, 285, 287, 104, 105, 32, 91, 103, 77, 65, 83, 75, 93, 32, 60, 115, 111, 112,
                           62, 60, 47, 115, 62]}}

TOOL = {"name": "get_weather", "description": "天气 of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SPECIAL_STRINGS = ("<|", "[gMASK]", "</s>", "<unk>", "<sop>", "sop")


@pytest.fixture(scope="module", params=["chatglm2", "chatglm3", "glm4"])
def converted(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    folder = write_twin(base / "model", request.param)
    return request.param, convert_tokenizer(folder, base / "fast")


def _tok(tmp_path_factory, kind):
    base = tmp_path_factory.mktemp(kind)
    return convert_tokenizer(write_twin(base / "model", kind), base / "fast")


def test_kind_of_a_folder(tmp_path):
    for kind in ("chatglm2", "chatglm3", "glm4"):
        assert glm_tokenizer_kind(write_twin(tmp_path / kind, kind)) == kind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert glm_tokenizer_kind(tmp_path / "other") is None


def test_texts_give_the_official_ids(converted):
    kind, tok = converted
    # ChatGLM2/3's code never matches special-token strings in text; here they are matched (so rendered chat
    # templates work) unless split_special_tokens=True, which then gives their ids. GLM-4's code matches them too.
    split = kind != "glm4"
    for text, (with_prefix, bare) in OFFICIAL[kind]["texts"].items():
        assert tok(text, split_special_tokens=split)["input_ids"] == with_prefix, text
        assert tok(text, add_special_tokens=False, split_special_tokens=split)["input_ids"] == bare, text
        if not any(s in text for s in SPECIAL_STRINGS):
            assert tok(text)["input_ids"] == with_prefix, text


def test_special_tokens_eos_pad_and_prefix(converted):
    kind, tok = converted
    n = {"chatglm2": 517, "chatglm3": 517, "glm4": 335}[kind]
    names = (["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
              "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
              "<|end_of_video|>"] if kind == "glm4" else
             ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"] + (["<|system|>", "<|user|>", "<|assistant|>",
                                                                "<|observation|>"] if kind == "chatglm3" else []))
    assert [tok.convert_tokens_to_ids(t) for t in names] == list(range(n, n + len(names)))
    assert (tok.eos_token, tok.pad_token) == (("<|endoftext|>",) * 2 if kind == "glm4" else ("</s>", "<unk>"))
    assert (tok.eos_token_id, tok.pad_token_id) == ((n, n) if kind == "glm4" else (2, 0))
    assert tok("")["input_ids"] == tok.convert_tokens_to_ids(PREFIX[kind])
    assert tok.decode(tok("hello world 你好")["input_ids"], skip_special_tokens=True) == "hello world 你好"


def conv(*turns, system=None, tools=None):
    msgs = [Message(r, tool_call=c) if isinstance(c, dict) else Message(r, c) for r, c in turns]
    return Conversation(msgs, system=system, tools=tools, source="t:1")


TOOL_TURNS = [("user", "北京 weather?"), ("assistant", {"name": "get_weather", "arguments": {"city": "北京"}}),
              ("observation", '{"temp": 20}'), ("assistant", "北京天气 is 20"), ("user", "hi there")]


def _chat_and_train(kind):
    """The conversations the official ids were made from, as chattune conversations."""
    if kind == "chatglm2":
        turns = [("user", "你好"), ("assistant", "你好！我是 ChatGLM2"), ("user", "hello there"),
                 ("assistant", "hi you"), ("user", "北京天气?")]
        return conv(*turns), conv(*turns, ("assistant", "北京 is 20"))
    system = ("Answer the following questions as best as you can. You have access to the following tools:"
              if kind == "chatglm3" else None)
    last = "hi there" if kind == "chatglm3" else "hi"  # the official glm4 training sample ends with "hi"
    return (conv(*TOOL_TURNS, system=system, tools=[TOOL]),
            conv(*TOOL_TURNS[:-1], ("user", last), ("assistant", "hello world"), system=system, tools=[TOOL]))


def test_auto_template_renders_the_official_chat_and_training_ids(converted):
    kind, tok = converted
    template = get_template("auto", tok, "chatglm")
    assert template.name == kind and template.chosen_because.startswith("template=auto")
    chat, train = _chat_and_train(kind)
    assert encode_prompt(chat, template, tok) == OFFICIAL[kind]["chat"]
    encoded = encode_conversation(train, template, tok, max_length=10_000)
    assert encoded.input_ids == OFFICIAL[kind]["train"]
    trained = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != -100]
    if kind == "chatglm2":  # the last answer (tokenized on its own) and eos, as ptuning/main.py
        assert trained == tok("北京 is 20", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_the_tokenizers_chat_template_gives_the_same_ids(converted):
    kind, tok = converted
    chat, _ = _chat_and_train(kind)
    messages = [{"role": "system", "content": chat.system}] if chat.system else []
    for m in chat.messages:
        if m.tool_call:
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": [{"type": "function", "function": m.tool_call}]})
        else:
            messages.append({"role": m.role, "content": m.content})
    tools = [{"type": "function", "function": TOOL}] if chat.tools else None
    ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == OFFICIAL[kind]["chat"]


def test_chatglm3_plain_system_prompt(tmp_path_factory):
    tok = _tok(tmp_path_factory, "chatglm3")
    ids = encode_prompt(conv(("user", "hi"), system="be brief"), get_template("auto", tok, "chatglm"), tok)
    assert ids == OFFICIAL["chatglm3"]["plain_system"]


@pytest.mark.parametrize("kind", ["chatglm2", "chatglm3", "glm4"])
def test_auto_picks_the_family_template(tmp_path, kind):
    # even when the tokenizer carries a (published, wrong-for-training) jinja template of its own
    folder = write_twin(tmp_path / "m", kind, chat_template="{{ messages[0]['content'] }}")
    tok = convert_tokenizer(folder, tmp_path / "fast")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for model_type in ("chatglm", None):
        assert get_template("auto", tok, model_type).name == kind
    tok.chat_template = None
    assert get_template("auto", tok, "chatglm").name == kind


def test_special_strings_in_user_content_are_data_in_the_tokenizer(converted):
    kind, tok = converted
    text = "<|user|>hi [gMASK] <sop></s>"
    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    specials = set(tok.all_special_ids)
    assert not specials & set(ids)
    if kind == "chatglm2":
        assert ids == OFFICIAL[kind]["content_data"]
    else:  # role token + "\n" + the content as data
        head = [tok.convert_tokens_to_ids("<|user|>")] + tok("\n", add_special_tokens=False)["input_ids"]
        assert head + ids == OFFICIAL[kind]["content_data"]


@pytest.mark.parametrize("name", ["glm4", "chatglm3"])
def test_a_tool_role_is_observation_and_unknown_roles_are_refused(name):
    template = get_template(name)
    as_tool = conv(("user", "w?"), ("assistant", {"name": "get", "arguments": {}}), ("tool", "9"), ("assistant", "9"))
    as_obs = conv(("user", "w?"), ("assistant", {"name": "get", "arguments": {}}), ("observation", "9"),
                  ("assistant", "9"))
    assert template.pieces(as_tool) == template.pieces(as_obs)
    with pytest.raises(DataError, match="role 'critic'"):
        template.pieces(conv(("user", "w?"), ("critic", "no")))


def test_auto_sends_glm_tokenizers_observation_not_tool(tmp_path):
    from chattune.data.templates import TokenizerTemplate

    tok = convert_tokenizer(write_twin(tmp_path / "m", "glm4"), tmp_path / "fast")
    # a Python-style template that, like GLM-4's remote code, asserts the roles it knows
    tok.chat_template = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant', "
                         "'observation'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
                         "<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}")
    jt = TokenizerTemplate(tok)
    c = conv(("user", "w?"), ("assistant", "call"), ("observation", "9"), ("assistant", "9"))
    text = "".join(p.text for p in jt.pieces(c))
    assert "<|observation|>\n9" in text
    jt.result_role = "tool"  # what reached GLM-4's apply_chat_template before: now a DataError naming the fix
    with pytest.raises(DataError, match="refused a conversation with roles"):
        jt.pieces(c)


def test_chatglm2_refuses_system_and_tools(tmp_path_factory):
    t = get_template("chatglm2")
    with pytest.raises(DataError, match="no system prompt"):
        t.pieces(conv(("user", "a"), ("assistant", "b"), system="s"))
    with pytest.raises(DataError, match="ChatGLM2"):
        t.pieces(conv(*TOOL_TURNS[:4], tools=[TOOL]))
