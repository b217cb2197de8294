"""`chattune data inspect [SOURCE] [CONFIG] [key=value ...]`.

SOURCE is a data file, folder or `hf:` id; without it the config's `data.train` (one source or a list, with
`data.mix`) is inspected. The first item is a CONFIG rather than a SOURCE when it ends in .yaml/.yml or is the bare
name of a shipped config (`lora`) and no such file exists."""

HELP = ("validate a dataset and show how it is mixed, tokenized and trained: chattune data inspect SOURCE "
        "[key=value ...], or chattune data inspect data.train=[a.jsonl,b.parquet] data.mix=[0.7,0.3]")


def configure(p) -> None:
    p.add_argument("action", choices=["inspect"])
    p.add_argument("args", nargs="+", metavar="SOURCE|CONFIG|key=value",
                   help="a data file, folder or hf:ORG/NAME (default: the config's data.train), then a config and "
                        "key=value overrides")
    p.add_argument("--sample", type=int, default=0, help="index of the sample to show")


def split_source(items: list[str]) -> tuple[str | None, list[str]]:
    """(SOURCE or None, the CONFIG and key=value items after it)."""
    from pathlib import Path

    from chattune.shipped import shipped_config

    if not items or "=" in items[0]:
        return None, list(items)
    first = items[0]
    is_config = first.endswith((".yaml", ".yml")) or (
        "/" not in first and ":" not in first and not Path(first).exists() and shipped_config(first) is not None)
    return (None, list(items)) if is_config else (first, list(items[1:]))


# The run-config keys `data inspect` reads: train.seed is the seed of data.mix's draw.
DATA_KEYS = ("model", "model.*", "template", "data.*", "train.seed")


def check_keys(overrides: list[str]) -> None:
    """`data inspect` reads DATA_KEYS; any other key given on the command line would change nothing, so it is
    refused naming those (config.check_command_keys)."""
    from chattune.config import check_command_keys

    check_command_keys("data inspect", overrides, DATA_KEYS)


def run(args) -> int:
    from chattune.config import apply_overrides, config_from_dict, read_yaml_config, set_dotted, split_config_arg
    from chattune.data.inspect import inspect
    from chattune.errors import ConfigError
    from chattune.log import log

    source, rest = split_source(args.args)
    config, overrides = split_config_arg(rest)
    check_keys(overrides)
    raw = apply_overrides(read_yaml_config(config) if config else {}, overrides)
    if source is not None:
        if any(o.split("=", 1)[0].strip() == "data.train" for o in overrides):
            raise ConfigError(f"the data to inspect is given twice: as {source} and as data.train=; give one")
        set_dotted(raw, "data.train", source)
    inspect(None, config_from_dict(raw), sample=args.sample, log=log)
    return 0
