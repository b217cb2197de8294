"""Tiny, deterministic test models and tokenizers, built in milliseconds from a config (nothing downloaded).

The tokenizer is byte-level with no merges and token id == byte value (so "hi" is [104, 105]); special
tokens follow from id 256 in the order of SPECIALS. That makes expected token ids readable in tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "[gMASK]", "sop", "<sop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>", "</s>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]
SPECIAL_ID = {tok: 256 + i for i, tok in enumerate(SPECIALS)}
VOCAB_SIZE = 256 + len(SPECIALS)

# A ChatML template with a default system prompt, in the style of SmolLM2's.
CHATML_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def make_tokenizer(eos: str = "<|im_end|>", pad: str | None = None, chat_template: str | None = CHATML_JINJA):
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad or eos,
                                   additional_special_tokens=SPECIALS)
    assert all(fast.convert_tokens_to_ids(t) == i for t, i in SPECIAL_ID.items())
    if chat_template:
        fast.chat_template = chat_template
    return fast


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def make_tiny_llama(path: str | Path, seed: int = 0, tokenizer=None, **config) -> Path:
    """A 2-layer random Llama (grouped-query attention: 4 heads, 2 kv heads) saved with its tokenizer."""
    path = Path(path)
    tokenizer = tokenizer or make_tokenizer()
    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
              tie_word_embeddings=False)
    kw.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def q4_exact(o: int, k: int, seed: int = 0) -> torch.Tensor:
    """fp32 weights that are exactly Q4_1 blocks, as the GGUF reader expands them: d * q + m (d, m fp16)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (o, k // 32, 32), generator=g).float()
    q[..., 3], q[..., 20] = 0, 15  # every block reaches both ends of the range, as Q4_1 quantisation makes it
    d = (torch.rand(o, k // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-d * 7.5 + torch.randn(o, k // 32, 1, generator=g) * 1e-3).half().float()
    return (d * q + m).reshape(o, k)


def q8_exact(o: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (o, k // 32, 32), generator=g).float()
    q[..., 5] = 127
    d = (torch.rand(o, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    return (d * q).reshape(o, k)


def make_block_exact(model):
    """Every linear weight of `model` set to exact Q4_1 blocks, the output head (`lm_head`) to Q8_0 blocks."""
    with torch.no_grad():
        for i, (name, mod) in enumerate(model.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                o, k = mod.weight.shape
                mod.weight.copy_(q8_exact(o, k, i) * 16 if name == "lm_head" else q4_exact(o, k, i) * 4)
    return model


def exact_tiny(tmp_path, tie: bool = False):
    """A tiny Llama whose every linear weight is exactly Q4_1 blocks and whose output head is Q8_0 blocks."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path / "m", tie_word_embeddings=tie, vocab_size=288)
    return make_block_exact(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
