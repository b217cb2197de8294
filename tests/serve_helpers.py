"""A chattune server on 127.0.0.1 in a background thread, for the serve and web-page tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    with running_server(app) as (url, _):
        yield url


def _server_class():
    import uvicorn

    class LoopServer(uvicorn.Server):
        """uvicorn's server, keeping its event loop so that a test can look at the tasks running on it."""

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

    return LoopServer


def server_tasks(server) -> list[str]:
    """The names of the asyncio tasks on a running server's loop (their coroutines'), this one's left out."""
    async def names():
        me = asyncio.current_task()
        return sorted(t.get_coro().__qualname__ for t in asyncio.all_tasks() if t is not me)

    return asyncio.run_coroutine_threadsafe(names(), server.loop).result(10)


@contextmanager
def running_server(app):
    """(url, server) of `app` served on 127.0.0.1 in a background thread; `server.loop` is its event loop."""
    import uvicorn

    port = free_port()
    server = _server_class()(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield url, server
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class Script:
    """Makes the model answer with given token ids (then the stop token), whatever the prompt: a forward hook on
    the output head replaces its logits. Only the model's numbers are scripted; the server path is the real one."""

    def __init__(self, model, ids: list[int] | None = None, delay: float = 0.0):
        self.ids, self.delay, self.step, self.last = ids, delay, 0, None
        model.register_forward_pre_hook(self._reset, with_kwargs=True)
        model.get_output_embeddings().register_forward_hook(self._force)

    def _reset(self, module, args, kwargs):
        ids, positions = kwargs.get("input_ids"), kwargs.get("position_ids")
        # A new prompt: a prefill, or one token that does not follow the last one (the rest of a prompt whose
        # start the server's prompt cache held)
        jump = positions is not None and positions.shape[0] == 1 and self.last is not None \
            and int(positions[0, 0]) != self.last + 1
        if ids is not None and (ids.shape[1] > 1 or jump):
            self.step = 0
        if positions is not None:
            self.last = int(positions[0, -1])

    def _force(self, module, inputs, output):
        if self.delay:
            time.sleep(self.delay)
        if self.ids is None:
            return None
        target = self.ids[min(self.step, len(self.ids) - 1)]
        self.step += 1
        forced = output.clone().fill_(-1e4)
        forced[..., target] = 1e4
        return forced


def make_adapter(base, out, seed: int, template: str = "chatml", peft_config=None, info: dict | None = None):
    """A LoRA run's output as chattune writes it (adapter + chattune.json) on the tiny model at `base`, its B
    matrices random (peft's init_lora_weights=False) so that each adapter answers differently from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chattune.outputs import write_info

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = peft_config or LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    write_info(out, {"base_model": str(base), "model_spec": str(base), "method": "lora", "template": template,
                     **(info or {})})
    return out
