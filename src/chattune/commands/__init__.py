"""The `chattune` subcommands. Each module here is one command with the same shape:

- `HELP`: one line for `chattune --help`;
- `configure(parser)`: add its arguments to its argparse subparser;
- `run(args) -> int`: do the work (heavy imports inside, so `chattune --help` stays fast).

Adding a command = one module + one entry in COMMANDS (its order is the order of `chattune --help`).
Every command reads `key=value` overrides through config.py; `model_config` below does it for the commands that
load a trained model (`eval`, `serve`), each naming the keys that mean something to it.
"""

COMMANDS = ["quickstart", "train", "data", "eval", "compare", "plot", "chat", "serve", "export", "estimate", "bench"]


def add_packed_option(p, default: str = "auto") -> None:
    """`--packed auto|off` of the commands that run a model (`chat`, `serve`; `eval`, where it is off by default):
    load_tuned(packed=...)."""
    p.add_argument("--packed", choices=["auto", "off"], default=default,
                   help=f"auto: on a CPU, decode layers whose fp32 weights are exactly 4-/8-bit blocks (the bundled "
                        f"model's) from those blocks; off: torch's fp32 matmuls everywhere (default: {default})")


def add_decode_step_option(p, default: str = "auto") -> None:
    """`--decode-step auto|transformers` of `chat`, `serve` and `eval` (models/decode_step.py)."""
    p.add_argument("--decode-step", choices=["auto", "transformers"], default=default,
                   help="auto: chattune's own decode step for Llama-layout models where it gives transformers' "
                        f"results (checked at start-up); transformers: the model's own forward (default: {default})")


def model_config(command: str, adapter: str | None, model: str | None, overrides: list[str],
                 applies: dict[str, str], inherited: tuple[str, ...] = (), hints: dict[str, str] | None = None,
                 log=print):
    """The `key=value` overrides of a command that loads a trained model (`eval`, `serve`), through the same
    machinery as `train` (config.command_config). The `inherited` keys start from the run's recorded config.yaml
    (an `--adapter`/`--model` folder's, or its run's for a checkpoint-N); template and trust_remote_code come from
    the run's chattune.json unless given. Returns (config, keys given, `load_tuned` keyword arguments)."""
    from pathlib import Path

    from chattune.config import command_config, get_dotted, recorded_config, set_dotted

    folder = adapter or model
    recorded, path = recorded_config(folder) if folder and Path(folder).is_dir() else ({}, None)
    base: dict = {}
    for key in inherited:
        found, value = get_dotted(recorded, key)
        if found:
            set_dotted(base, key, value)
    cfg, given = command_config(command, overrides, applies, base, path, hints)
    load: dict = {}
    if "template" in given:
        load["template"] = cfg.template
    if "model.trust_remote_code" in given:
        load["trust_remote_code"] = cfg.model.trust_remote_code
    if "train.precision" in given:
        from chattune.hardware import torch_dtype

        precision, why = inference_precision(cfg.train.precision, folder)
        log(f"precision: {precision} ({why})")
        load["dtype"] = torch_dtype(precision)
    return cfg, given, load


def inference_precision(precision: str, folder: str | None) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why) to load and run a model in: `auto` is the precision the run trained in (its
    chattune.json), else what training would choose on this machine; fp16 on a CPU is fp32, as in training."""
    from pathlib import Path

    from chattune.hardware import choose_precision, device_type
    from chattune.outputs import read_info

    device = device_type()
    if precision == "auto" and folder and Path(folder).is_dir():
        recorded = read_info(folder).get("precision")
        if recorded in ("fp32", "bf16") or (recorded == "fp16" and device == "cuda"):
            return recorded, "the precision the run trained in (its chattune.json)"
    return choose_precision(precision, device)
