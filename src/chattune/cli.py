"""`chattune <command>`: parses arguments and calls one function per command.

User errors (ChattuneError) print one message and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from chattune import __version__
from chattune.errors import ChattuneError

COMMANDS_HELP = """commands:
  quickstart          fine-tune the bundled model on a demo dataset and chat before/after (minutes, CPU)
  train [CONFIG] [key=value ...]   fine-tune (configs: lora, ptuning_v2, freeze, sft, qlora)
  data inspect FILE [key=value ...]   validate a dataset and show how it is tokenized and trained
  chat (--adapter DIR | --model DIR) [--prompt TEXT]   talk to a model in the terminal
  export --adapter DIR --out DIR   merge an adapter into its base model (plain HF folder)
  bench [key=value ...]   tutorial recipe vs chattune defaults: tokens/s, memory, loss
"""


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_train(args) -> int:
    from chattune.config import load_config
    from chattune.train.trainer import train

    config, overrides = _split_config_arg(args.args)
    cfg = load_config(config, overrides)
    result = train(cfg, log=_log)
    note = " (stopped early by train.stop_after)" if result.stopped_early else ""
    _log(f"done{note}: {result.steps} steps in {result.train_seconds:.1f}s, final loss "
         f"{result.final_loss if result.final_loss is None else round(result.final_loss, 4)}, "
         f"{result.tokens_per_s:.0f} tokens/s, peak memory {result.peak_memory_mb:.0f} MB -> {result.output_dir}")
    return 0


def _split_config_arg(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_data(args) -> int:
    from chattune.config import load_config
    from chattune.data.inspect import inspect

    if args.action != "inspect":
        raise ChattuneError(f"unknown data action {args.action!r}; try: chattune data inspect FILE")
    config, overrides = _split_config_arg(args.args)
    cfg = load_config(config, overrides)
    inspect(args.file, cfg, sample=args.sample, log=_log)
    return 0


def cmd_chat(args) -> int:
    from chattune.chat import answer_once, chat_loop
    from chattune.inference import load_tuned

    tuned = load_tuned(adapter=args.adapter, model=args.model, template=args.template, log=_log)
    if args.prompt is not None:
        print(answer_once(tuned, args.prompt, args.system, args.max_new_tokens, args.temperature))
        return 0
    chat_loop(tuned, args.system, args.max_new_tokens, args.temperature)
    return 0


def cmd_export(args) -> int:
    from chattune.export import export

    export(args.adapter, args.out, log=_log)
    return 0


def cmd_bench(args) -> int:
    from chattune.bench import main as bench_main

    return bench_main(args.args, log=_log)


def cmd_quickstart(args) -> int:
    from chattune.quickstart import quickstart

    quickstart(output_dir=args.output_dir, steps=args.steps, log=_log)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chattune", description="Fine-tune chat LLMs on your own conversations.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMMANDS_HELP)
    p.add_argument("--version", action="version", version=f"chattune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quickstart", help="fine-tune the bundled model on demo data and chat before/after")
    q.add_argument("--output-dir", default="runs/quickstart")
    q.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's setting)")
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="fine-tune: chattune train [CONFIG.yaml] [key=value ...]")
    t.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("data", help="chattune data inspect FILE [key=value ...]")
    d.add_argument("action", choices=["inspect"])
    d.add_argument("file")
    d.add_argument("args", nargs="*", metavar="key=value")
    d.add_argument("--sample", type=int, default=0, help="index of the sample to show")
    d.set_defaults(func=cmd_data)

    c = sub.add_parser("chat", help="chat in the terminal with a tuned or plain model")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="an adapter folder (a chattune output_dir)")
    src.add_argument("--model", help="a full model folder, hub id, or `bundled` (default)")
    c.add_argument("--prompt", help="answer this one prompt and exit")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--template", help="override the template (default: the one the run used)")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("export", help="merge an adapter into its base model and save a plain HF model")
    e.add_argument("--adapter", required=True)
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="tutorial recipe vs chattune defaults, in one process")
    b.add_argument("args", nargs="*", metavar="key=value")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _quiet_libraries()
    try:
        return args.func(args) or 0
    except ChattuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
