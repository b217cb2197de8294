"""ChatGLM-6B and ChatGLM2-6B: the conversation as one `[Round N] 问：… 答：…` prompt string, the last answer
tokenized on its own and trained; no system prompt, no tools. ChatGLM-6B's template is ChatGLM2's round parsing
with its own layout.
"""

from __future__ import annotations

from chattune.data.encode import Piece
from chattune.data.formats import Conversation, Message
from chattune.data.templates.base import Template, _ids, _merge, _strip_stops
from chattune.errors import DataError


class ChatGLM2Template(Template):
    """ChatGLM2-6B: `[gMASK]sop` then `[Round N]\n\n问：{query}\n\n答：{answer}\n\n` counting from 1, as its
    tokenizer's `build_prompt` writes it; no system prompt, no tools.

    As in its official finetune (ptuning/main.py), the prompt is one string (earlier rounds and their answers in
    it, tokenized together) and the last answer is tokenized on its own and followed by eos `</s>`; both are
    trained. Earlier answers are part of that prompt string, exactly as `build_prompt` gives them to the model at
    chat time, so only the last answer is trained (its `loss` flag decides whether it is)."""

    name = "chatglm2"
    prefix = ["[gMASK]", "sop"]
    eos = "</s>"
    family = "ChatGLM2"

    def _rounds(self, conv: Conversation) -> list[tuple[str, Message | None]]:
        problems = []
        if conv.system is not None:
            problems.append(f"{conv.source}: system: {self.family} has no system prompt")
        if conv.tools:
            problems.append(f"{conv.source}: tools: {self.family} has no tool format")
        rounds: list[tuple[str, Message | None]] = []
        for m in conv.messages:
            if m.role == "user" and (not rounds or rounds[-1][1] is not None):
                rounds.append((m.content, None))
            elif m.role == "assistant" and m.tool_call is None and rounds and rounds[-1][1] is None:
                rounds[-1] = (rounds[-1][0], m)
            else:
                problems.append(f"{conv.source}: role {m.role!r}: {self.family} takes alternating user/assistant turns "
                                "(no tool calls or results)")
                break
        if problems:
            raise DataError(problems, f"fix: drop the system prompt and tool turns for {self.family}, or use a model "
                                      "with a tool format (template=chatglm3 or glm4)")
        return rounds

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        rounds = self._rounds(conv)
        answered = rounds and rounds[-1][1] is not None and not add_generation_prompt
        prompt = ""
        for i, (query, answer) in enumerate(rounds, 1):
            prompt += f"[Round {i}]\n\n问：{query}\n\n答："
            if answer is not None and (i < len(rounds) or add_generation_prompt):
                prompt += answer.content + "\n\n"
        out = [Piece(p, special=True) for p in self.prefix] + [Piece(prompt)]
        if answered:
            last = rounds[-1][1]
            out += [Piece(last.content, last.train, keep=True), Piece(self.eos, last.train, special=True)]
        return _merge(out)

    def stop_tokens(self, tokenizer) -> list[int]:
        return _ids(tokenizer, [self.eos])

    def parse_assistant(self, text: str) -> tuple[str, list[dict]]:
        return _strip_stops(text, [self.eos]), []


class ChatGLM6BTemplate(ChatGLM2Template):
    """ChatGLM-6B (GLM v1), as its `chat()` and its official finetune (ptuning/main.py) build a sample: a first
    question alone is the bare query; with earlier rounds, the prompt is `[Round i]\n问：{query}\n答：{answer}\n`
    for each of them (counting from 0) and `[Round n]\n问：{query}\n答：` for the last. Then `[gMASK]` and
    `<sop>` FOLLOW the prompt (GLM v1 attends bidirectionally over everything before `<sop>`), the answer is
    tokenized on its own and ends with `<eop>`. No system prompt, no tools.

    As in ptuning/main.py (`labels = [-100] * context_length + input_ids[context_length:]`), the trained labels
    start at `<sop>`: the model learns `[gMASK] -> <sop>`, then the answer and `<eop>`. Earlier answers are part
    of the prompt (bidirectional context), so only the last answer is trained, as for ChatGLM2."""

    name = "chatglm6b"
    eos = "<eop>"
    family = "ChatGLM-6B"

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        rounds = self._rounds(conv)
        answered = rounds and rounds[-1][1] is not None and not add_generation_prompt
        open_rounds = rounds if not answered else rounds[:-1] + [(rounds[-1][0], None)]
        if len(open_rounds) == 1 and open_rounds[0][1] is None:
            prompt = open_rounds[0][0]
        else:
            prompt = ""
            for i, (query, answer) in enumerate(open_rounds):
                prompt += f"[Round {i}]\n问：{query}\n答："
                if answer is not None:
                    prompt += answer.content + "\n"
        train = answered and rounds[-1][1].train
        out = [Piece(prompt), Piece("[gMASK]", special=True), Piece("<sop>", train, special=True)]
        if answered:
            last = rounds[-1][1]
            out += [Piece(last.content, last.train, keep=True), Piece(self.eos, last.train, special=True)]
        return _merge(out)
