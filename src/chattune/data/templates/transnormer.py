"""TransNormerLLM: `Human:\n{query}\nAssistant:\n` prompts and answers that end in eos, as its publisher's
fine-tune script lays out a sample; no tools.
"""

from __future__ import annotations

from chattune.data.encode import Piece
from chattune.data.formats import Conversation
from chattune.data.templates.base import Template, _ids, _merge, _strip_stops
from chattune.errors import DataError


class TransNormerTemplate(Template):
    """TransNormerLLM (OpenNLPLab), as its publisher's fine-tune script (fine-tune/train.py) lays out a sample: the
    prompt `Human:\n{query}\nAssistant:\n` and the answer tokenized on its own, followed by eos `</s>` (the script
    appends the eos as text; here it is the eos token itself, the token generation stops on). The script puts an
    instruction that has an input in front of the prompt (`{instruction}\nHuman:\n{input}\n...`); here that place
    is the system prompt's (`{system}\n`), and an alpaca record's instruction and input form the question as for
    every template. Further rounds follow the eos with the next `Human:`; every answer is trained. No tools."""

    name = "transnormer"
    eos = "</s>"

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        problems = []
        if conv.tools:
            problems.append(f"{conv.source}: tools: TransNormerLLM has no tool format")
        expect = "user"
        for m in conv.messages:
            if m.role != expect or m.tool_call is not None:
                problems.append(f"{conv.source}: role {m.role!r}: TransNormerLLM takes alternating user/assistant "
                                "turns (no tool calls or results)")
                break
            expect = "assistant" if expect == "user" else "user"
        if problems:
            raise DataError(problems, "fix: drop the tool turns for TransNormerLLM")
        out = [Piece(conv.system + "\n")] if conv.system is not None else []
        for m in conv.messages:
            if m.role == "user":
                out.append(Piece(f"Human:\n{m.content}\nAssistant:\n"))
            else:
                out += [Piece(m.content, m.train, keep=True), Piece(self.eos, m.train, special=True)]
        return _merge(out)

    def stop_tokens(self, tokenizer) -> list[int]:
        return _ids(tokenizer, [self.eos])

    def parse_assistant(self, text: str) -> tuple[str, list[dict]]:
        return _strip_stops(text, [self.eos]), []
