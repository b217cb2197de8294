"""Exact token ids and labels for every template, and the loss-mask pitfalls of DESIGN.md.

The tiny tokenizer maps every byte to its own id (so text ids are `list(text.encode())`) and special tokens to
256 + their index in tiny.SPECIALS.
"""

import pytest

from chattune.data.collate import PaddingCollator
from chattune.data.encode import IGNORE, encode_conversation, encode_pieces, encode_prompt
from chattune.data.formats import Conversation, Message
from chattune.data.templates import TokenizerTemplate, get_template
from chattune.errors import ConfigError
from tiny import SPECIAL_ID as S
from tiny import ids, make_tokenizer

N = IGNORE


def conv(*turns, system=None, tools=None):
    msgs = []
    for role, content in turns:
        if isinstance(content, dict):
            msgs.append(Message(role, tool_call=content))
        else:
            msgs.append(Message(role, content))
    return Conversation(msgs, system=system, tools=tools, source="t:1")


def masked(n):
    return [N] * n


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def encode(c, template, tok):
    e = encode_conversation(c, template, tok, max_length=10_000)
    return e.input_ids, e.labels


# ---------------------------------------------------------------- chatml


def test_chatml_single_turn_exact(tok):
    t = get_template("chatml")
    input_ids, labels = encode(conv(("user", "hi"), ("assistant", "yo")), t, tok)
    prompt = [S["<|im_start|>"]] + ids("user\nhi") + [S["<|im_end|>"]] + ids("\n") + [S["<|im_start|>"]] + ids("assistant\n")
    answer = ids("yo") + [S["<|im_end|>"]]
    assert input_ids == prompt + answer + ids("\n")
    # trained: the answer and the <|im_end|> that stops generation; not the newline after it
    assert labels == masked(len(prompt)) + answer + [N]


def test_chatml_system_and_generation_prompt(tok):
    t = get_template("chatml")
    prompt_ids = encode_prompt(conv(("user", "hi"), system="be brief"), t, tok)
    assert prompt_ids == ([S["<|im_start|>"]] + ids("system\nbe brief") + [S["<|im_end|>"]] + ids("\n")
                          + [S["<|im_start|>"]] + ids("user\nhi") + [S["<|im_end|>"]] + ids("\n")
                          + [S["<|im_start|>"]] + ids("assistant\n"))
    assert t.stop_tokens(tok) == [S["<|im_end|>"]]


def test_multi_turn_trains_every_assistant_turn(tok):
    t = get_template("chatml")
    c = conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    input_ids, labels = encode(c, t, tok)
    trained = [i for i, lab in zip(input_ids, labels) if lab != N]
    assert trained == ids("b") + [S["<|im_end|>"]] + ids("d") + [S["<|im_end|>"]]
    c.messages[1].train = False  # data.train_on=last / `loss: false` on a message
    _, labels = encode(c, t, tok)
    assert [lab for lab in labels if lab != N] == ids("d") + [S["<|im_end|>"]]


def test_chatml_tool_call_and_observation(tok):
    t = get_template("chatml")
    c = conv(("user", "w?"), ("assistant", {"name": "get", "arguments": {"c": "P"}}), ("observation", "9"),
             ("assistant", "9 deg"), tools=[{"name": "get", "parameters": {}}])
    input_ids, labels = encode(c, t, tok)
    text = tok.decode(input_ids)
    assert '<tools>\n{"type": "function", "function": {"name": "get", "parameters": {}}}\n</tools>' in text
    assert "<|im_start|>user\n<tool_response>\n9\n</tool_response><|im_end|>\n" in text
    trained = tok.decode([i for i, lab in zip(input_ids, labels) if lab != N])
    assert trained == '<tool_call>\n{"name": "get", "arguments": {"c": "P"}}\n</tool_call><|im_end|>9 deg<|im_end|>'


# ---------------------------------------------------------------- llama3


def test_llama3_exact(tok):
    t = get_template("llama3")
    input_ids, labels = encode(conv(("user", " hi "), ("assistant", "yo"), system="s"), t, tok)
    head = lambda role: [S["<|start_header_id|>"]] + ids(role) + [S["<|end_header_id|>"]] + ids("\n\n")  # noqa: E731
    prompt = ([S["<|begin_of_text|>"]] + head("system") + ids("s") + [S["<|eot_id|>"]] + head("user") + ids("hi")
              + [S["<|eot_id|>"]] + head("assistant"))
    assert input_ids == prompt + ids("yo") + [S["<|eot_id|>"]]
    assert labels == masked(len(prompt)) + ids("yo") + [S["<|eot_id|>"]]
    assert t.stop_tokens(tok) == [S["<|eot_id|>"], S["<|eom_id|>"], S["<|end_of_text|>"]]


# ---------------------------------------------------------------- GLM family


def test_glm4_multi_turn_exact(tok):
    t = get_template("glm4")
    c = conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), system="s")
    input_ids, labels = encode(c, t, tok)
    expected = ([S["[gMASK]"], S["<sop>"], S["<|system|>"]] + ids("\ns") + [S["<|user|>"]] + ids("\na")
                + [S["<|assistant|>"]] + ids("\nb") + [S["<|user|>"]] + ids("\nc") + [S["<|assistant|>"]] + ids("\nd")
                + [S["<|user|>"]])
    assert input_ids == expected
    # trained: "\nb", the <|user|> that ends it, "\nd" and the final <|user|> (GLM-4's finetune demo)
    assert [(i, lab != N) for i, lab in zip(input_ids, labels)] == [
        (i, k in range(9, 12) or k in range(15, 18)) for k, i in enumerate(expected)]
    assert t.stop_tokens(tok) == [S["<|endoftext|>"], S["<|user|>"], S["<|observation|>"]]


def test_glm4_tools_and_tool_call(tok):
    t = get_template("glm4")
    c = conv(("user", "w?"), ("assistant", {"name": "get_w", "arguments": {"city": "巴黎"}}), ("observation", "9"),
             ("assistant", "ok"), tools=[{"name": "get_w", "parameters": {"type": "object"}}])
    input_ids, labels = encode(c, t, tok)
    text = tok.decode(input_ids)
    assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")
    # `# 可用工具\n## name`: GLM-4-9B-chat's template through transformers' jinja (trim_blocks), see test_template_jinja
    assert '\n\n# 可用工具\n## get_w\n\n{\n    "name": "get_w",' in text
    assert text.endswith('<|user|>\nw?<|assistant|>get_w\n{"city": "巴黎"}<|observation|>\n9<|assistant|>\nok<|user|>')
    trained = tok.decode([i for i, lab in zip(input_ids, labels) if lab != N])
    assert trained == 'get_w\n{"city": "巴黎"}<|observation|>\nok<|user|>'


def test_chatglm3_exact_and_final_eos(tok):
    t = get_template("chatglm3")
    input_ids, labels = encode(conv(("user", "hi"), ("assistant", "yo")), t, tok)
    prompt = [S["[gMASK]"], S["sop"], S["<|user|>"]] + ids("\nhi") + [S["<|assistant|>"]]
    assert input_ids == prompt + ids("\nyo") + [S["</s>"]]
    assert labels == masked(len(prompt)) + ids("\nyo") + [S["</s>"]]
    assert encode_prompt(conv(("user", "hi")), t, tok) == prompt


def test_chatglm3_tool_call_is_python_code(tok):
    t = get_template("chatglm3")
    c = conv(("user", "q"), ("assistant", {"name": "f", "arguments": {"x": "a", "n": 2}}), ("observation", "r"),
             ("assistant", "done"), tools=[{"name": "f"}])
    text = tok.decode(encode(c, t, tok)[0])
    assert "<|assistant|>f\n```python\ntool_call(x='a', n=2)\n```<|observation|>\nr" in text
    assert '<|system|>\nAnswer the following questions as best as you can. You have access to the following tools:\n[' in text


# ---------------------------------------------------------------- the tokenizer's own template


def test_auto_uses_tokenizer_template_and_matches_builtin(tok):
    t = get_template("auto", tok)
    assert isinstance(t, TokenizerTemplate)
    c = conv(("user", "hi"), ("assistant", "yo"), ("user", "x"), ("assistant", "z"))
    auto_ids, auto_labels = encode(c, t, tok)
    # The tiny template adds a default system prompt, as SmolLM2's does.
    builtin_ids, builtin_labels = encode(conv(*[(m.role, m.content) for m in c.messages], system="You are tiny."),
                                         get_template("chatml"), tok)
    assert auto_ids == builtin_ids
    assert auto_labels == builtin_labels
    assert tok.decode([i for i, lab in zip(auto_ids, auto_labels) if lab != N]) == "yo<|im_end|>z<|im_end|>"


def test_auto_appends_eos_when_template_has_no_stop(tok):
    plain = make_tokenizer(chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                         "{% if add_generation_prompt %}assistant: {% endif %}")
    t = get_template("auto", plain)
    input_ids, labels = encode(conv(("user", "hi"), ("assistant", "yo")), t, plain)
    assert input_ids == ids("user: hi\nassistant: ") + ids("yo\n") + [S["<|im_end|>"]] + ids("")
    assert labels == masked(len(ids("user: hi\nassistant: "))) + ids("yo\n") + [S["<|im_end|>"]]


def test_auto_without_chat_template_errors():
    bare = make_tokenizer(chat_template=None)
    with pytest.raises(ConfigError, match="template=chatml"):
        get_template("auto", bare)
    with pytest.raises(ConfigError, match="unknown template `nope`"):
        get_template("nope", bare)


# ---------------------------------------------------------------- pitfalls


def test_pad_equal_to_eos_keeps_the_stop_label(tok):
    """Masking labels by `== pad_id` would erase <|im_end|> when pad == eos; chattune's labels never do."""
    assert tok.pad_token_id == tok.eos_token_id == S["<|im_end|>"]
    t = get_template("chatml")
    a = encode_conversation(conv(("user", "hi"), ("assistant", "yo")), t, tok, 10_000)
    b = encode_conversation(conv(("user", "hello there"), ("assistant", "ok")), t, tok, 10_000)
    batch = PaddingCollator(tok.pad_token_id)([{"input_ids": a.input_ids, "labels": a.labels},
                                               {"input_ids": b.input_ids, "labels": b.labels}])
    row = batch["labels"][0].tolist()
    assert row[len(a.labels) - 2] == S["<|im_end|>"]  # the stop token is a target
    assert row[len(a.labels):] == [N] * (len(row) - len(a.labels))  # padding is not
    assert batch["attention_mask"][0].sum() == len(a.input_ids)


def test_piecewise_encoding_matches_whole_string_for_chatml(tok):
    t = get_template("chatml")
    c = conv(("user", "hi there"), ("assistant", "fine, thanks"))
    input_ids, _ = encode_pieces(t.pieces(c), tok)
    assert input_ids == tok(tok.decode(input_ids), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["auto", "chatml", "llama3", "chatglm3", "glm4"])
def test_chat_prompt_is_a_prefix_of_the_training_ids(tok, name):
    """The template used at chat time produces exactly the ids the model saw before each answer in training."""
    t = get_template(name, tok)
    c = conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), system="s")
    input_ids, labels = encode(c, t, tok)
    for upto in (1, 3):  # prompts ending before the first and the second answer
        prompt = encode_prompt(Conversation(c.messages[:upto], system="s"), t, tok)
        assert input_ids[:len(prompt)] == prompt
        assert labels[len(prompt) - 1] == N and labels[len(prompt)] != N  # the answer starts right after


# ---------------------------------------------------------------- reading answers back: parse_assistant

BUILTINS = ["chatml", "llama3", "chatglm3", "glm4"]
CALL = {"name": "get_weather", "arguments": {"city": "巴黎", "days": [1, 2], "metric": True, "note": None, "x": 0.5}}
CALL2 = {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}
TOOLS = [{"name": "get_weather", "parameters": {"type": "object"}}, {"name": "get_time"}]


def generated(template, tok, *answers, skip_special_tokens=True):
    """The text a model trained on this conversation generates for its final assistant message(s): the trained
    ids of those messages, decoded the way `inference.generate` decodes (special tokens skipped)."""
    msgs = [Message("user", "q")]
    for a in answers:
        msgs.append(Message("assistant", tool_call=a) if isinstance(a, dict) else Message("assistant", a))
    c = Conversation(msgs, tools=TOOLS, source="t:1")
    input_ids, labels = encode(c, template, tok)
    return tok.decode([i for i in labels if i != N], skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("name", ["auto", *BUILTINS])
@pytest.mark.parametrize("skip", [True, False])
def test_parse_assistant_inverts_a_rendered_tool_call(tok, name, skip):
    t = get_template(name, tok)
    text = generated(t, tok, CALL, skip_special_tokens=skip)
    assert t.parse_assistant(text) == ("", [CALL])


@pytest.mark.parametrize("name", ["auto", *BUILTINS])
def test_parse_assistant_plain_text(tok, name):
    t = get_template(name, tok)
    answer = 'Sunny, 25°C.\nTomorrow: {"rain": false} maybe.'
    assert t.parse_assistant(generated(t, tok, answer)) == (answer, [])
    assert t.parse_assistant("just words") == ("just words", [])
    assert t.parse_assistant("") == ("", [])


@pytest.mark.parametrize("name", ["chatml", "chatglm3", "glm4"])
@pytest.mark.parametrize("skip", [True, False])
def test_parse_assistant_several_calls_in_one_answer(tok, name, skip):
    """Templates that let one generation hold several calls (ChatML in one turn, GLM turn after turn)."""
    t = get_template(name, tok)
    assert t.parse_assistant(generated(t, tok, CALL, CALL2, skip_special_tokens=skip)) == ("", [CALL, CALL2])


def test_chatml_text_and_calls_share_one_turn(tok):
    t = get_template("chatml")
    c = Conversation([Message("user", "q"), Message("assistant", "Checking."), Message("assistant", tool_call=CALL2),
                      Message("assistant", tool_call=CALL2)], source="t:1")
    text = "".join(p.text for p in t.pieces(c))
    call = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>'
    assert text.endswith(f"<|im_start|>assistant\nChecking.\n{call}\n{call}<|im_end|>\n")
    assert t.parse_assistant(f"Checking.\n{call}\n{call}") == ("Checking.", [CALL2, CALL2])


@pytest.mark.parametrize("name", ["auto", *BUILTINS])
def test_parse_assistant_json_string_arguments(tok, name):
    """OpenAI-style arguments (a JSON string) render as that JSON and come back as a dict."""
    t = get_template(name, tok)
    text = generated(t, tok, {"name": "get_time", "arguments": '{"tz": "Europe/Paris"}'})
    assert t.parse_assistant(text) == ("", [CALL2])


MALFORMED = {
    "auto": ['{"name": "f", "arguments": {"a": 1}', '{"name": "f"}', '{"name": "f", "arguments": 3}',
             '<tool_call>\n{"name": "f", "arguments": {}}'],
    "chatml": ['<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
               '<tool_call>\n{"name": "f", "arguments": {}}',  # cut off before </tool_call>
               '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\nand more text',
               '<tool_call>\n{"arguments": {}}\n</tool_call>', '{"name": "f", "arguments": {}}'],
    "llama3": ['{"name": "f", "parameters": {"a": 1}', '{"name": "f", "parameters": {}} and text',
               '{"name": "", "parameters": {}}', '[{"name": "f", "parameters": {}}]'],
    "glm4": ['get_weather\n{"city": ', 'get_weather\nnot json', 'two words\n{"a": 1}', 'get_weather\n{"a": 1} tail',
             'get_weather\n[1, 2]'],
    "chatglm3": ["f\n```python\ntool_call(x=)\n```", "f\n```python\ntool_call(x=__import__('os').getcwd())\n```",
                 "f\n```python\nprint('hi')\n```", "f\n```python\ntool_call('positional')\n```",
                 "f\nno code here"],
}


@pytest.mark.parametrize("name", ["auto", *BUILTINS])
def test_parse_assistant_malformed_call_is_text(tok, name):
    t = get_template(name, tok)
    for text in MALFORMED[name]:
        assert t.parse_assistant(text) == (text, []), text


def test_llama3_tools_the_llama31_way(tok):
    t = get_template("llama3")
    c = conv(("user", " weather? "), ("assistant", {"name": "get_w", "arguments": {"c": "P"}}), ("observation", "9"),
             ("assistant", "9 deg"), system="Be brief.", tools=[{"name": "get_w", "parameters": {}}])
    text = "".join(p.text for p in t.pieces(c))
    tool = '{\n    "type": "function",\n    "function": {\n        "name": "get_w",\n        "parameters": {}\n    }\n}'
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a "
        "function call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
        '{"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.'
        f"\n\n{tool}\n\nweather?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_w", "parameters": {"c": "P"}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n"9"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n9 deg<|eot_id|>")


@pytest.mark.parametrize("name", ["auto", *BUILTINS])
def test_parse_assistant_python_keywords_as_argument_names(tok, name):
    """`from`/`to` are common argument names; in ChatGLM3's code-style call they make the text invalid Python."""
    call = {"name": "convert_currency", "arguments": {"amount": 500, "from": "USD", "to": "EUR"}}
    t = get_template(name, tok)
    text = generated(t, tok, call)
    if name == "chatglm3":
        assert text == "convert_currency\n```python\ntool_call(amount=500, from='USD', to='EUR')\n```"
    assert t.parse_assistant(text) == ("", [call])
