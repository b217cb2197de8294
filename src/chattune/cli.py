"""`chattune <command>`: builds the parser from the command modules in `chattune.commands` and runs one.

User errors (ChattuneError) print one message and exit with code 2, never a traceback; so does an error raised
inside a model's own (remote) code, which names the failing call and the way out.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from chattune import __version__
from chattune.commands import COMMANDS
from chattune.errors import ChattuneError, remote_code_failure


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chattune", description="Fine-tune chat LLMs on your own conversations.")
    p.add_argument("--version", action="version", version=f"chattune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMANDS:
        module = importlib.import_module(f"chattune.commands.{name}")
        cp = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(cp)
        cp.set_defaults(func=module.run)
    return p


def drop_local_rank(argv: list[str]) -> list[str]:
    """Remove the `--local_rank=N` (`--local-rank N`, ...) that the `deepspeed` launcher (and torch's legacy
    launcher) passes to every process; LOCAL_RANK in the environment says the same and is what chattune reads, so
    it is set from the argument when a launcher did not set it."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out += argv[i:]
            break
        name, eq, value = a.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq and i + 1 < len(argv) and argv[i + 1].strip().isdigit():
                i += 1
                value = argv[i]
            if value.strip().isdigit():
                os.environ.setdefault("LOCAL_RANK", value.strip())
        else:
            out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(drop_local_rank(sys.argv[1:] if argv is None else list(argv)))
    if extra:  # key=value overrides after --flags (`estimate --gpus 8 train.batch_size=1`) belong to `args`
        if not hasattr(args, "args") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.args = [*args.args, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from chattune.log import quiet_libraries

    quiet_libraries()
    try:
        return args.func(args) or 0
    except ChattuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - only errors raised inside a model's own code are turned into a message
        failure = remote_code_failure(e)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return failure.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
