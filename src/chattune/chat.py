"""`chattune chat`: a terminal chat with streamed answers and multi-turn history."""

from __future__ import annotations

import sys

from chattune.data.formats import Message
from chattune.inference import Tuned, conversation, generate

HELP = "commands: /clear (forget the conversation), /exit (quit)"


def answer_once(tuned: Tuned, prompt: str, system: str | None = None, max_new_tokens: int = 256,
                temperature: float = 0.0) -> str:
    return generate(tuned, conversation([], prompt, system), max_new_tokens, temperature)


def chat_loop(tuned: Tuned, system: str | None = None, max_new_tokens: int = 512, temperature: float = 0.0,
              stdin=None, stdout=None) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[Message] = []
    stdout.write(f"chatting with {tuned.source} ({HELP})\n")
    while True:
        stdout.write("\nyou> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/clear":
            history = []
            stdout.write("(conversation cleared)\n")
            continue
        if text.startswith("/"):
            stdout.write(f"unknown command {text}; {HELP}\n")
            continue
        stdout.write("assistant> ")
        reply = []
        for piece in generate(tuned, conversation(history, text, system), max_new_tokens, temperature, stream=True):
            reply.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        history += [Message("user", text), Message("assistant", "".join(reply))]
