"""chattune's built-in templates against the publishers' own chat templates, and the chat_template.jinja files
chattune writes next to a tuned model.

Official templates (tests/fixtures/official_templates, see SOURCES.md there) are rendered through transformers'
jinja environment (`apply_chat_template(..., chat_template=..., tokenize=False)`); chattune's text is the
concatenation of its pieces, special-token pieces as their token strings.
"""

import json
from pathlib import Path

import pytest

from chattune.data.encode import encode_conversation, encode_pieces, encode_prompt
from chattune.data.formats import Conversation, Message
from chattune.data.template_files import (
    chat_template_jinja,
    content_prefix,
    generation_config_eos,
    pieces_text,
    to_messages,
    write_generation_config,
    write_template_files,
)
from chattune.data.templates import Template, get_template
from chattune.errors import ConfigError
from tiny import SPECIAL_ID as S
from tiny import make_tokenizer

OFFICIAL = Path(__file__).parent / "fixtures" / "official_templates"

TOOLS = [{"name": "get_weather", "description": "Weather of a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
         {"name": "get_time", "parameters": {"type": "object", "properties": {}}}]
W = {"name": "get_weather", "arguments": {"city": "巴黎"}}
T = {"name": "get_time", "arguments": {}}


def official(name: str) -> str:
    return (OFFICIAL / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def c(*turns, system=None, tools=None):
    msgs = [Message(role, tool_call=x) if isinstance(x, dict) else Message(role, x) for role, x in turns]
    return Conversation(msgs, system=system, tools=tools, source="t:1")


# A battery of conversations: name -> conversation. Prompts end with a user/observation turn and are rendered
# with the generation prompt; the others end with an assistant answer.
BATTERY = {
    "single": c(("user", "Hi!"), ("assistant", "Hello.")),
    "system": c(("user", "Hi!"), ("assistant", "Hello."), system="You are brief."),
    "multi_turn": c(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d\n\nwith lines"),
                    system="s"),
    "empty_system": c(("user", "a"), ("assistant", "b"), system=""),
    "empty_system_tools": c(("user", "a"), ("assistant", W), ("observation", "1"), ("assistant", "b"), system="",
                            tools=TOOLS),
    "whitespace_unicode": c(("user", "  空格 and tabs\t"), ("assistant", " 答案：是。 "), system=" sys "),
    "prompt": c(("user", "a"), ("assistant", "b"), ("user", "c?"), system="s"),
    "prompt_no_system": c(("user", "c?")),
    "tools": c(("user", "Weather in Paris?"), ("assistant", W), ("observation", '{"temp": 21}'),
               ("assistant", "21 degrees."), system="Use tools.", tools=TOOLS),
    "tools_no_system": c(("user", "Weather in Paris?"), ("assistant", W), ("observation", "21"),
                         ("assistant", "21 degrees."), tools=TOOLS),
    "tools_prompt_after_observation": c(("user", "Weather?"), ("assistant", W), ("observation", "21"),
                                        system="Use tools.", tools=TOOLS),
    "tools_two_calls": c(("user", "Weather and time?"), ("assistant", W), ("assistant", T), ("observation", "21"),
                         ("observation", "12:00"), ("assistant", "21 degrees at noon."), system="Use tools.",
                         tools=TOOLS),
    "tools_text_then_call": c(("user", "Weather?"), ("assistant", "Let me look."), ("assistant", W),
                              ("observation", "21"), ("assistant", "21."), system="Use tools.", tools=TOOLS),
    "tools_call_text_call": c(("user", "Weather, then time?"), ("assistant", W), ("assistant", "Now the time."),
                              ("assistant", T), ("observation", "12:00"), ("assistant", "Noon."), system="Use tools.",
                              tools=TOOLS),
    "tools_plain_answer": c(("user", "Hi"), ("assistant", "Hello."), system="Use tools.", tools=TOOLS),
}


def is_prompt(conv: Conversation) -> bool:
    return conv.messages[-1].role != "assistant"


def chattune_text(name: str, conv: Conversation, tok, content_prefix: str = "") -> str:
    t = get_template(name, tok)
    pieces = t.pieces(conv, add_generation_prompt=is_prompt(conv))
    if name in ("glm4", "chatglm3") and not is_prompt(conv):
        # Deliberate (DESIGN.md, GLM finetune demos): a training sample ends with the token that hands the turn
        # back (`<|user|>` / `</s>`), which the official chat templates, written for prompting, do not render.
        assert pieces[-1].special and pieces[-1].text == t.final
        pieces = pieces[:-1]
    return pieces_text(pieces, content_prefix)


def openai_call(call: dict) -> dict:
    return {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def wrapped_tools(conv: Conversation):
    return [{"type": "function", "function": t} for t in conv.tools] if conv.tools else None


def qwen_messages(conv: Conversation) -> list[dict]:
    """Qwen2.5's message format: an answer's text and its tool calls are one assistant message."""
    msgs = [{"role": "system", "content": conv.system}] if conv.system is not None else []
    for m in conv.messages:
        if m.role == "assistant" and m.tool_call is not None and msgs and msgs[-1]["role"] == "assistant":
            msgs[-1].setdefault("tool_calls", []).append(openai_call(m.tool_call))
        elif m.role == "assistant" and m.tool_call is not None:
            msgs.append({"role": "assistant", "content": "", "tool_calls": [openai_call(m.tool_call)]})
        else:
            msgs.append({"role": "tool" if m.role == "observation" else m.role, "content": m.content})
    return msgs


def llama_messages(conv: Conversation) -> list[dict]:
    msgs = [{"role": "system", "content": conv.system}] if conv.system is not None else []
    for m in conv.messages:
        if m.tool_call is not None:
            msgs.append({"role": "assistant", "tool_calls": [openai_call(m.tool_call)]})
        else:
            msgs.append({"role": "tool" if m.role == "observation" else m.role, "content": m.content})
    return msgs


def glm4_messages(conv: Conversation) -> list[dict]:
    """GLM-4's own format: tools on the system message, a call as `metadata` (the name) + content (arguments)."""
    msgs = []
    if conv.tools or conv.system is not None:
        msgs.append({"role": "system", "content": conv.system or ""})
        if conv.tools:
            msgs[0]["tools"] = wrapped_tools(conv)
    for m in conv.messages:
        if m.tool_call is not None:
            msgs.append({"role": "assistant", "metadata": m.tool_call["name"],
                         "content": json.dumps(m.tool_call["arguments"], ensure_ascii=False)})
        else:
            msgs.append({"role": m.role, "content": m.content})
    return msgs


def chatglm3_messages(conv: Conversation) -> list[dict]:
    msgs = [{"role": "system", "content": conv.system}] if conv.system is not None else []
    return msgs + [{"role": m.role, "content": m.content} for m in conv.messages]


# case -> (built-in, official file, message mapping, the conversations the official template covers, kwargs)
CASES = {
    # Qwen2.5 adds its own default system prompt when there is none, so only conversations with one compare.
    "chatml/Qwen2.5": ("chatml", "Qwen2.5-7B-Instruct.jinja", qwen_messages, lambda conv: conv.system is not None, {}),
    # Llama 3 has no tool format; with tools, chattune follows Llama 3.1 (which alone would add a date header to
    # every conversation).
    "llama3/Llama-3": ("llama3", "Meta-Llama-3-8B-Instruct.jinja", llama_messages, lambda conv: not conv.tools,
                       {"bos_token": "<|begin_of_text|>"}),
    "llama3/Llama-3.1": ("llama3", "Llama-3.1-8B-Instruct.jinja", llama_messages, lambda conv: bool(conv.tools),
                         {"bos_token": "<|begin_of_text|>"}),
    "glm4/GLM-4": ("glm4", "glm-4-9b-chat.jinja", glm4_messages, lambda conv: True, {}),
    # ChatGLM3's template has no tools and no tool calls (its Python tokenizer code handles those); its space
    # before content stands for a SentencePiece prefix, which empty text does not get.
    "chatglm3/ChatGLM3": ("chatglm3", "chatglm3-6b.jinja", chatglm3_messages,
                          lambda conv: not conv.tools and all(m.tool_call is None for m in conv.messages)
                          and conv.system != "", {}),
}


def covered(case: str) -> list[str]:
    cover = CASES[case][3]
    return [k for k, conv in BATTERY.items() if cover(conv)]


@pytest.mark.parametrize("case", list(CASES))
def test_builtin_equals_the_official_template(tok, case):
    builtin, file, to_messages, _, kwargs = CASES[case]
    names = covered(case)
    assert len(names) >= 4  # the comparison covers a real part of the battery
    for key in names:
        conv = BATTERY[key]
        tools = wrapped_tools(conv) if builtin != "glm4" else None  # GLM-4 reads tools from the system message
        expected = tok.apply_chat_template(to_messages(conv), tools=tools, chat_template=official(file),
                                           tokenize=False, add_generation_prompt=is_prompt(conv), **kwargs)
        # ChatGLM3's template writes a space before every content: the text form of the SentencePiece prefix its
        # tokenizer adds to content encoded on its own, which chattune does by encoding content separately.
        prefix = " " if builtin == "chatglm3" else ""
        assert chattune_text(builtin, conv, tok, prefix) == expected, key


def test_every_battery_conversation_is_compared_somewhere():
    compared = {k for case in CASES for k in covered(case)}
    assert compared == set(BATTERY)


def test_auto_reads_tool_calls_of_a_native_hermes_template():
    """`auto` on a tokenizer whose own template has native tools (Qwen2.5's): the call is trained in the Hermes
    form and read back from the generated text."""
    from chattune.data.encode import IGNORE, encode_conversation

    qwen = make_tokenizer(chat_template=official("Qwen2.5-7B-Instruct.jinja"))
    t = get_template("auto", qwen)
    conv = c(("user", "Weather?"), ("assistant", W), system="Use tools.", tools=TOOLS)
    e = encode_conversation(conv, t, qwen, max_length=10_000)
    text = qwen.decode([i for i in e.labels if i != IGNORE], skip_special_tokens=True)
    assert text == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "巴黎"}}\n</tool_call>'
    assert t.parse_assistant(text) == ("", [W])


# ---------------------------------------------------------------- chat_template.jinja for every built-in

BUILTIN_NAMES = ["chatml", "llama3", "glm4", "chatglm3"]
STRING_ARGS = c(("user", "Time?"), ("assistant", {"name": "get_time", "arguments": '{"tz": "UTC"}'}),
                ("observation", "12:00"), ("assistant", "Noon."), system="s", tools=TOOLS)


def jinja_battery(name: str) -> dict:
    battery = dict(BATTERY)
    if name != "chatglm3":  # ChatGLM3 writes `key=value` pairs, so it needs arguments as a dict
        battery["string_arguments"] = STRING_ARGS
    return battery


def render(tok, jinja: str, conv: Conversation, group_calls=False, result_role="tool") -> str:
    msgs, tools = to_messages(conv, group_calls=group_calls)
    for m in msgs:
        if m["role"] == "tool":
            m["role"] = result_role
    return tok.apply_chat_template(msgs, tools=tools, chat_template=jinja, tokenize=False,
                                   add_generation_prompt=is_prompt(conv))


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_chat_template_jinja_renders_chattunes_text(tok, name):
    t = get_template(name, tok)
    jinja = chat_template_jinja(t, tok)
    for key, conv in jinja_battery(name).items():
        pieces = t.pieces(conv, add_generation_prompt=is_prompt(conv))
        text = pieces_text(pieces)
        assert render(tok, jinja, conv) == text, key
        # the OpenAI message form (text and calls in one message) and other names for the tool role
        assert render(tok, jinja, conv, group_calls=True, result_role="observation") == text, key
        # tokenized, it is exactly what chattune trains on (the tiny tokenizer is byte-level)
        assert tok.encode(text, add_special_tokens=False) == encode_pieces(pieces, tok)[0], key


def test_auto_jinja_is_the_tokenizers_own(tok):
    assert chat_template_jinja(get_template("auto", tok), tok) == tok.chat_template


def sentencepiece_tokenizer():
    """A tokenizer that, like ChatGLM3's SentencePiece one, starts text encoded on its own with `▁`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁": 1, "a": 2, "▁a": 3}, merges=[("▁", "a")], unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")


def test_chatglm3_jinja_for_a_sentencepiece_tokenizer_is_chatglm3s_own_text(tok):
    """With a SentencePiece tokenizer the chatglm3 jinja writes the content prefix as a space, as ChatGLM3-6B's
    own template does; with a byte-level one it does not."""
    sp = sentencepiece_tokenizer()
    assert content_prefix(sp) == " " and content_prefix(tok) == ""
    jinja = chat_template_jinja(get_template("chatglm3"), sp)
    for key in covered("chatglm3/ChatGLM3"):
        conv = BATTERY[key]
        ours = render(tok, jinja, conv)
        if not is_prompt(conv):
            assert ours.endswith("</s>")  # the training sample's terminator, see chattune_text
            ours = ours[: -len("</s>")]
        expected = tok.apply_chat_template(chatglm3_messages(conv), chat_template=official("chatglm3-6b.jinja"),
                                           tokenize=False, add_generation_prompt=is_prompt(conv))
        assert ours == expected, key


def test_unknown_template_has_no_jinja(tok):
    class Other(Template):
        name = "other"

    with pytest.raises(ConfigError, match="template `other` has no jinja form"):
        chat_template_jinja(Other(), tok)


# ---------------------------------------------------------------- files in a model folder


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_written_chat_template_is_loaded_with_the_model(tmp_path, tok, name):
    """A folder saved with the tokenizer's own template gets chattune's; AutoTokenizer then renders exactly the
    ids chattune trains on and prompts with."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    t = get_template(name, tok)
    path = write_template_files(tmp_path, t, tok)
    assert path == tmp_path / "chat_template.jinja"
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == chat_template_jinja(t, tok) != tok.chat_template
    conv = BATTERY["tools"]
    msgs, tools = to_messages(conv)
    ids = loaded.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=False)
    assert ids == encode_conversation(conv, t, tok, max_length=10_000).input_ids
    prompt = BATTERY["tools_prompt_after_observation"]
    msgs, tools = to_messages(prompt)
    assert loaded.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, return_dict=False) == \
        encode_prompt(prompt, t, tok)
    assert not list(tmp_path.glob(".chat_template.jinja.*"))  # written through a temporary file


def test_generation_config_eos_lists_the_stop_tokens(tmp_path, tok):
    from transformers import GenerationConfig

    llama3 = get_template("llama3")
    stops = [S["<|eot_id|>"], S["<|eom_id|>"], S["<|end_of_text|>"]]
    assert generation_config_eos(llama3, tok) == stops
    # a new file
    write_generation_config(tmp_path, llama3, tok)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": stops}
    # an existing one: the stop tokens first, then the ids it had; every other setting kept
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [S["<|im_end|>"], S["<|eot_id|>"]], "max_new_tokens": 7, "pad_token_id": 257}))
    write_generation_config(tmp_path, llama3, tok)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {
        "eos_token_id": stops + [S["<|im_end|>"]], "max_new_tokens": 7, "pad_token_id": 257}
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == stops + [S["<|im_end|>"]]
    # a single int eos and the GLM stop tokens
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": S["<|endoftext|>"]}))
    write_generation_config(tmp_path, get_template("glm4"), tok)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [
        S["<|endoftext|>"], S["<|user|>"], S["<|observation|>"]]


def test_generate_with_the_written_generation_config_stops_at_a_template_stop(tmp_path):
    """Plain `model.generate` on a saved model stops where `chattune chat` stops. The tiny model's output head is
    replaced by one that always answers `<|eot_id|>`: before generation_config.json lists it, generation runs to
    max_new_tokens; after, it stops at once."""
    import torch
    from transformers import AutoModelForCausalLM

    from tiny import make_tiny_llama

    tok = make_tokenizer()
    folder = make_tiny_llama(tmp_path / "m", tokenizer=tok)
    prompt = torch.tensor([encode_prompt(c(("user", "hi")), get_template("llama3"), tok)])

    def new_tokens():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[S["<|eot_id|>"]] = 1.0
        model.lm_head = head
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        return out[0, prompt.shape[1]:].tolist()

    assert new_tokens() == [S["<|eot_id|>"]] * 5
    write_generation_config(folder, get_template("llama3"), tok)
    assert new_tokens() == [S["<|eot_id|>"]]


# ---------------------------------------------------------------- real tool-call data


@pytest.mark.parametrize("file", ["glaive_toolcall_en_demo.json", "glaive_toolcall_zh_demo.json"])
def test_glaive_tool_calls_round_trip_and_jinja_matches(shared_data, tok, file):
    """Every record of LLaMA-Factory's glaive tool-call demos (tools, calls, results, answers), with every
    built-in: the chat_template.jinja renders chattune's text, and each answer, generated as trained, parses
    back to the same text or call."""
    from chattune.data.encode import IGNORE
    from chattune.data.formats import load_conversations

    convs = load_conversations(shared_data / "llamafactory" / file).conversations
    assert len(convs) == 300 and sum(bool(cv.tools) for cv in convs) > 100
    calls_checked = 0
    for name in BUILTIN_NAMES:
        t = get_template(name, tok)
        jinja = chat_template_jinja(t, tok)
        for conv in convs:
            assert render(tok, jinja, conv) == pieces_text(t.pieces(conv)), conv.source
            for k, m in enumerate(conv.messages):
                if m.role != "assistant" or (k > 0 and conv.messages[k - 1].role == "assistant"):
                    continue  # one answer at a time (a call right after another shares its turn in ChatML)
                for j, other in enumerate(conv.messages):
                    other.train = j == k
                labels = encode_conversation(conv, t, tok, max_length=100_000).labels
                # decoded with its special tokens: the tiny tokenizer has ChatGLM3's bare `sop` as a special
                # token, which it also finds inside words ("sophisticated") and would drop
                text = tok.decode([i for i in labels if i != IGNORE], skip_special_tokens=False)
                if m.tool_call is None:
                    expected = (m.content.strip() if name == "llama3" else m.content, [])
                else:
                    args = m.tool_call["arguments"]
                    expected = ("", [{"name": m.tool_call["name"],
                                      "arguments": json.loads(args) if isinstance(args, str) else args}])
                    calls_checked += 1
                assert t.parse_assistant(text) == expected, (name, conv.source, text)
    assert calls_checked > 4 * 100
