"""`chattune serve (--adapter DIR | --model DIR) [--lora NAME=DIR ...] [--host 127.0.0.1] [--port 8000] ...
[key=value ...]`.

The `key=value` items: the KEYS below and `train`'s `model.*` keys (commands.MODEL_KEYS)."""

from chattune.commands import add_block_weights_option, add_decode_step_option, add_device_options, add_overrides

HELP = "serve a model: OpenAI-compatible /v1/chat/completions and /v1/completions, and a web chat page at /"

# The run-config keys that change what `serve` does besides the model.* ones (the others are refused, never ignored).
KEYS = {
    "template": "the chat template (default: the one the run used; --template is the same)",
    "model.trust_remote_code": "load a remote-code model (default: as the run did)",
    "train.precision": "the same as --dtype: auto (default), fp32, bf16, fp16",
}
HINTS = {"model.path": "give the model with --model or --adapter",
         "data.system": "a request sets its system prompt with a `system` message"}


def configure(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="a chattune output_dir (adapter or full model) or a checkpoint in it")
    src.add_argument("--model", help="a model folder, hub id, or `bundled` (default)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="also serve a LoRA run of the same base as model NAME (repeatable; serve/adapters.py)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or env CHATTUNE_API_KEY)")
    p.add_argument("--max-queue", type=_at_least_one, default=16,
                   help="requests that may wait (at least 1); more get 503 + Retry-After")
    p.add_argument("--max-batch", type=_at_least_one, default=8,
                   help="requests decoded together (continuous batching); 1: one at a time")
    p.add_argument("--max-tokens", type=_at_least_one, default=512, help="default max_tokens of a request")
    p.add_argument("--prompt-cache", type=_at_least_zero, default=256, metavar="MB",
                   help="keep finished requests' keys and values (up to MB) so that a prompt starting with one "
                        "prefills only the rest (serve/prompt_cache.py); 0: off (default 256)")
    add_device_options(p)
    p.add_argument("--template", help="override the template (default: the one the run used); = template=NAME")
    add_block_weights_option(p)
    add_decode_step_option(p)
    add_overrides(p, KEYS)


def _at_least(least: int, hint: str):
    """An argparse type: a whole number of at least `least`; `hint` says what to give instead."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is not allowed: {hint}")
        return value

    return parse


_at_least_one = _at_least(1, "give at least 1")
_at_least_zero = _at_least(0, "give 0 (off) or more")


def load(args, log=print):
    """The model to serve, loaded as the flags and `key=value` overrides say (a bad key fails before loading);
    `args.decode_step` becomes the decode step that will run (commands.decode_step_choice); with `--lora`,
    `args.models` the models requests may name (serve/adapters.py)."""
    from chattune.commands import command_placement, decode_step_choice, model_config
    from chattune.inference import load_tuned
    from chattune.serve.adapters import add_loras, check_loras
    from chattune.serve.app import model_name

    overrides = ([f"template={args.template}"] if args.template else []) + list(args.args)
    cfg, given, kwargs = model_config("serve", args.adapter, args.model, overrides, KEYS, hints=HINTS, log=log)
    args.decode_step = decode_step_choice(args.decode_step, cfg, log)
    kwargs.update(command_placement(args, cfg, given))
    loras = check_loras(args.lora)  # before the base loads
    tuned = load_tuned(adapter=args.adapter, model=args.model, log=log, packed=args.block_weights == "auto", **kwargs)
    if loras:
        spec = args.model or (None if args.adapter else "bundled")
        args.models = add_loras(model_name(tuned), tuned, loras, spec or tuned.info.get("model_spec"), log)
    return tuned


def run(args) -> int:
    import os

    from chattune.errors import ConfigError
    from chattune.log import log

    if args.max_batch < 1:  # before the model loads
        raise ConfigError(f"--max-batch {args.max_batch}: must be at least 1 (1 serves one request at a time)")
    tuned = load(args, log)
    import uvicorn

    from chattune.serve.app import create_app, model_name

    key = args.api_key or os.environ.get("CHATTUNE_API_KEY") or None
    app = create_app(tuned, api_key=key, max_queue=args.max_queue, default_max_tokens=args.max_tokens,
                     max_batch=args.max_batch, decode_step=args.decode_step, bind_host=args.host,
                     models=getattr(args, "models", None), prompt_cache_mb=args.prompt_cache)
    worker = app.state.worker
    batching = (f"continuous batching of up to {worker.max_batch} requests" if worker.batching else
                "one request at a time" + (" (this model cannot be batched exactly)" if worker.max_batch > 1 else ""))
    batching += ("; chattune's decode step" if worker.decode_step == "chattune" else
                 f"; transformers' decode step: {worker.decode_why}")
    names = ", ".join(m.id for m in getattr(args, "models", None) or []) or model_name(tuned)
    cache = worker.prompt_cache
    batching += (f"; prompt cache {cache.budget >> 20} MB" if cache else
                 f"; no prompt cache ({worker.prompt_cache_why})")
    log(f"serving {names} on http://{args.host}:{args.port} (web chat at /, API at /v1; {batching})"
        + (", API key required" if key else ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
