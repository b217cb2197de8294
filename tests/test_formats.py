"""Reading (data/readers.py) and validation (data/formats.py) of alpaca, messages and sharegpt records."""

import json

import pytest

from chattune.data.formats import Message, load_conversations
from chattune.data.readers import find_split
from chattune.errors import DataError
from tiny import write_jsonl


def load(tmp_path, records, name="d.jsonl", **kw):
    return load_conversations(write_jsonl(tmp_path / name, records), **kw)


def problems(tmp_path, records, **kw):
    with pytest.raises(DataError) as e:
        load(tmp_path, records, **kw)
    return e.value.problems


def test_alpaca_with_input_system_history(tmp_path):
    r = load(tmp_path, [{"instruction": "Sum", "input": "1 2", "output": "3", "system": "math",
                         "history": [["hi", "hello"]]}])
    c = r.conversations[0]
    assert r.format == "alpaca"
    assert c.system == "math"
    assert [(m.role, m.content) for m in c.messages] == [
        ("user", "hi"), ("assistant", "hello"), ("user", "Sum\n1 2"), ("assistant", "3")]
    assert c.source.endswith("d.jsonl:1")


def test_alpaca_empty_output_is_allowed(tmp_path):
    # e.g. a triple-extraction sample with no triples: the model must learn to answer nothing and stop
    c = load(tmp_path, [{"instruction": "x", "output": ""}]).conversations[0]
    assert c.messages[-1] == Message("assistant", "")


def test_messages_tools_toolcall_observation_and_loss(tmp_path):
    rec = {"messages": [
        {"role": "system", "content": "sys", "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": {"name": "f", "arguments": {"a": 1}}},
        {"role": "observation", "content": "r"},
        {"role": "assistant", "content": "ans", "loss": False},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "ans2"},
    ]}
    c = load(tmp_path, [rec]).conversations[0]
    assert c.system == "sys" and c.tools == [{"name": "f"}]
    assert c.messages[1].tool_call == {"name": "f", "arguments": {"a": 1}}
    assert [m.train for m in c.messages if m.role == "assistant"] == [True, False, True]


def test_train_on_last(tmp_path):
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    c = load(tmp_path, [rec], train_on="last").conversations[0]
    assert [m.train for m in c.messages if m.role == "assistant"] == [False, True]


def test_sharegpt_tools_as_json_string(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "q"},
                             {"from": "function_call", "value": json.dumps({"name": "f", "arguments": {"x": 1}})},
                             {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "done"}],
           "tools": json.dumps([{"name": "f", "description": "d"}]), "system": "s"}
    r = load(tmp_path, [rec], name="s.json")
    c = r.conversations[0]
    assert r.format == "sharegpt" and c.tools == [{"name": "f", "description": "d"}] and c.system == "s"
    assert c.messages[1].tool_call == {"name": "f", "arguments": {"x": 1}}


def test_json_array_locations_and_error_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "ok", "output": "x"}, {"instruction": "", "output": "y"},
                                {"instruction": 3, "output": "z"}]))
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert e.value.problems == [f"{path}[1]: instruction: is empty",
                                f"{path}[2]: instruction: expected a string, got number"]


@pytest.mark.parametrize("record,expected", [
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "b"}]}, "messages[1].role: the system message must be the first"),
    ({"messages": [{"role": "user", "content": "a", "tools": []}, {"role": "assistant", "content": "b"}]},
     "messages[0].tools: `tools` is only allowed on the system message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "observation", "content": "r"},
                   {"role": "assistant", "content": "b"}]}, "messages[1].role: an observation must follow"),
    ({"messages": [{"role": "user", "content": "a"}]}, "(record): no assistant message: nothing to train on"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages[2].role: the conversation must end with an assistant"),
    ({"messages": []}, "messages: is empty"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from: unknown speaker 'robot'"),
    ({"instruction": "a", "output": "b", "history": [["only one"]]}, "history[0]: expected a [user, assistant] pair"),
    ({"prompt": "a"}, "(record): unknown format (keys: prompt)"),
])
def test_invalid_records(tmp_path, record, expected):
    found = problems(tmp_path, [record])
    assert len(found) == 1 and expected in found[0] and found[0].startswith(str(tmp_path / "d.jsonl") + ":1: ")


def test_bad_json_line_names_the_line_and_skip_invalid(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{not json\n{"instruction": "c", "output": "d"}\n')
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert e.value.problems == [f"{path}:2: (line): invalid JSON: Expecting property name enclosed in double quotes "
                                "(column 2)"]
    r = load_conversations(path, skip_invalid=True)
    assert len(r.conversations) == 2 and len(r.problems) == 1


def test_bom_non_utf8_and_empty_file(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n')
    assert len(load_conversations(bom).conversations) == 1
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError) as e:
        load_conversations(bad)
    assert e.value.problems == [f"{bad}:1: (line): not UTF-8: byte 0xe9 at byte offset 20 (column 21); "
                                "re-save the file as UTF-8"]
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        load_conversations(empty)


def test_folder_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"}])
    write_jsonl(tmp_path / "dev.jsonl", [{"instruction": "c", "output": "d"}])
    assert find_split(tmp_path, "train").name == "train.jsonl"
    assert find_split(tmp_path, "eval").name == "dev.jsonl"
    with pytest.raises(DataError, match="no test split"):
        find_split(tmp_path, "test")


@pytest.mark.parametrize("name,fmt,count", [
    ("huanhuan/huanhuan.json", "alpaca", 3729),
    ("llamafactory/glaive_toolcall_zh_demo.json", "sharegpt", 300),
    ("advertisegen/dev.messages.jsonl", "messages", 1070),
    ("spo/train.jsonl", "alpaca", 1441),
])
def test_shared_datasets_parse(shared_data, name, fmt, count):
    r = load_conversations(shared_data / name)
    assert (r.format, len(r.conversations), r.problems) == (fmt, count, [])
