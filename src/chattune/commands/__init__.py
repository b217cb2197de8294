"""The `chattune` subcommands. Each module here is one command with the same shape:

- `HELP`: one line for `chattune --help`;
- `configure(parser)`: add its arguments to its argparse subparser;
- `run(args) -> int`: do the work (heavy imports inside, so `chattune --help` stays fast).

Adding a command = one module + one entry in COMMANDS (its order is the order of `chattune --help`).
Every command reads `key=value` overrides through config.py; `add_overrides` and `model_config` below do it for the
commands that load a trained model (`chat`, `eval`, `serve`): each takes `train`'s `model.*` keys (MODEL_KEYS) and
names the other keys that mean something to it.
"""

import argparse

COMMANDS = ["quickstart", "train", "data", "eval", "compare", "plot", "chat", "serve", "export", "convert", "estimate",
            "bench"]


def add_block_weights_option(p, default: str = "auto") -> None:
    """`--block-weights auto|off` of the commands that run a model (`chat`, `serve`; `eval`, where it is off by
    default): load_tuned(packed=...) (models/blockweights.py). `--packed`, its former name, works for one more
    release: it sets the same value and says it was renamed."""
    p.add_argument("--block-weights", choices=["auto", "off"], default=default,
                   help=f"auto: on a CPU, decode layers whose fp32 weights are exactly 4-/8-bit blocks (the bundled "
                        f"model's) from those blocks; off: torch's fp32 matmuls everywhere (default: {default}; "
                        "formerly --packed)")
    p.add_argument("--packed", choices=["auto", "off"], dest="block_weights", default=argparse.SUPPRESS,
                   action=RenamedOption, new_name="--block-weights", help=argparse.SUPPRESS)


class RenamedOption(argparse.Action):
    """An option's former name, kept for one release: stores the value under the new option's dest and prints a
    one-line notice (stderr) naming the new option."""

    def __init__(self, option_strings, dest, new_name: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_name = new_name

    def __call__(self, parser, namespace, values, option_string=None):
        from chattune.log import log

        log(f"note: {option_string} is renamed {self.new_name}; the old name still works in this release only")
        setattr(namespace, self.dest, values)


RUN_DTYPE_HELP = ("the dtype to run the model in: auto (the run's precision where it trained on this kind of "
                  "device, else bf16 on a GPU, bf16 on a CPU with bf16 instructions, fp32 on others), fp32, bf16, "
                  "fp16 (GPU only)")


def add_device_options(p, device_map: bool = True, device_default: str = "auto",
                       dtype_help: str = RUN_DTYPE_HELP) -> None:
    """`--device`, `--dtype` and (`device_map`) `--device-map` of every command that runs a model (`chat`, `eval`,
    `serve`, `export`; `compare` passes its eval.device / eval.dtype to `eval`). Decided in one place,
    hardware.decide_device_and_dtype, by `placement` below (export: its own dtype rule, see export.py)."""
    from chattune.hardware import DTYPES

    p.add_argument("--device", type=_device_argument, default=device_default, metavar="auto|cpu|cuda|cuda:N",
                   help=f"where the model runs: auto (a CUDA GPU where there is one, else the CPU), cpu, cuda, "
                        f"cuda:N (default: {device_default})")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help=f"{dtype_help} (default: auto)")
    if device_map:
        p.add_argument("--device-map", choices=["auto"], default=None,
                       help="auto: spread a model too large for one GPU over the visible GPUs (accelerate; GPUs only)")


def _device_argument(text: str) -> str:
    """argparse's `type` for --device: the form is checked as the options are read (exit 2, usage)."""
    import argparse

    from chattune.errors import ConfigError
    from chattune.hardware import parse_device

    try:
        return parse_device(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--device {text}: ")) from None


def placement(folder: str | None, device: str = "auto", dtype: str = "auto", device_map: str | None = None,
              precision_key: str | None = None) -> dict:
    """`load_tuned`'s device, dtype and device_map for `--device`, `--dtype`, `--device-map` (and the `train.precision`
    key of eval/serve: the same as --dtype; both given must agree), decided by hardware.decide_device_and_dtype
    from what the run in `folder` recorded, and why (`placement_why`: load_tuned logs the one start-up line, once
    the model is loaded, with the device its parameters are on)."""
    from chattune.errors import ConfigError
    from chattune.hardware import decide_device_and_dtype, torch_dtype
    from chattune.inference import recorded_hardware

    asked_by = "--dtype"
    if precision_key is not None:
        if dtype not in ("auto", precision_key):
            raise ConfigError(f"--dtype {dtype} and train.precision={precision_key} disagree; give one of them")
        dtype, asked_by = precision_key, "train.precision"
    where, precision, why = decide_device_and_dtype(device, dtype, recorded_hardware(folder), device_map, asked_by)
    if device_map:
        why += f"; --device-map {device_map}"
    return {"device": where, "dtype": torch_dtype(precision), "device_map": device_map, "placement_why": why}


def add_decode_step_option(p, default: str = "auto") -> None:
    """`--decode-step auto|transformers` of `chat`, `serve` and `eval` (models/decode_step.py)."""
    p.add_argument("--decode-step", choices=["auto", "transformers"], default=default,
                   help="auto: chattune's own decode step for Llama-layout models where it gives transformers' "
                        f"results (checked at start-up); transformers: the model's own forward (default: {default})")


# The `model.*` keys of `train` that `chat`, `eval` and `serve` take too (after their options: `chattune chat --model
# DIR model.trust_remote_code=true`); each reaches `load_tuned`.
MODEL_KEYS = {
    "model.trust_remote_code": "load a remote-code model (default: as the run did)",
    "model.attn_implementation": "the attention implementation: eager, sdpa, flash_attention_2, ... (default: the "
                                 "run's, else transformers' choice)",
    "model.revision": "a hub model's branch, tag or commit (default: the one the run trained on)",
}
# The other `model.*` keys, refused with the reason.
MODEL_HINTS = {
    "model.path": "give the model with --model or --adapter",
    "model.load_in_8bit": "an 8-bit base is a training setting (bitsandbytes, CUDA): an adapter trained on one is "
                          "loaded on one, as its run recorded, and a plain model unquantized",
}
# Keys whose value starts from the run's recorded config.yaml (trust_remote_code: from its chattune.json, in
# load_tuned).
MODEL_INHERITED = ("model.attn_implementation",)


def command_keys(keys: dict[str, str]) -> dict[str, str]:
    """A command's own keys, then the MODEL_KEYS it does not list itself: every key the command takes."""
    return {**keys, **{k: v for k, v in MODEL_KEYS.items() if k not in keys}}


def add_overrides(p, keys: dict[str, str], what: str = "run-config overrides") -> None:
    """The positional `key=value ...` of a command that loads a model (`chat`, `eval`, `serve`); `keys` are its
    own, the model.* keys are added. (`args`: cli.main appends `key=value` items given after the options there.)"""
    p.add_argument("args", nargs="*", metavar="key=value", help=f"{what}: " + ", ".join(command_keys(keys)))


def model_config(command: str, adapter: str | None, model: str | None, overrides: list[str],
                 applies: dict[str, str], inherited: tuple[str, ...] = (), hints: dict[str, str] | None = None,
                 log=print):
    """The `key=value` overrides of a command that loads a trained model (`chat`, `eval`, `serve`), through the
    same machinery as `train` (config.command_config: did-you-mean for an unknown key, type and range errors; a
    known key that does nothing for the command refused with the keys that apply). `applies` are the command's
    own keys; MODEL_KEYS apply to every such command. The `inherited` keys (and MODEL_INHERITED) start from the
    run's recorded config.yaml (an `--adapter`/`--model` folder's, or its run's for a checkpoint-N); template and
    trust_remote_code come from the run's chattune.json unless given. Returns (config, keys given, `load_tuned`
    keyword arguments); where the model runs is `command_placement`'s, asked once the command's own checks passed."""
    from pathlib import Path

    from chattune.config import command_config, get_dotted, recorded_config, set_dotted

    folder = adapter or model
    recorded, path = recorded_config(folder) if folder and Path(folder).is_dir() else ({}, None)
    base: dict = {}
    for key in (*inherited, *MODEL_INHERITED):
        found, value = get_dotted(recorded, key)
        if found:
            set_dotted(base, key, value)
    cfg, given = command_config(command, overrides, command_keys(applies), base, path, {**MODEL_HINTS,
                                                                                         **(hints or {})})
    load: dict = {}
    if "template" in given:
        load["template"] = cfg.template
    if "model.trust_remote_code" in given:
        load["trust_remote_code"] = cfg.model.trust_remote_code
    if "model.revision" in given:
        load["revision"] = cfg.model.revision
    attention = cfg.model.attn_implementation
    if attention:
        check_attention(attention)
        log(f"attention: {attention} (model.attn_implementation"
            + ("" if "model.attn_implementation" in given else f", as recorded in {path}") + ")")
        load["attn_implementation"] = attention
    return cfg, given, load


def command_placement(args, cfg, given: set | list) -> dict:
    """`placement` for a command's parsed options (--adapter/--model, --device, --dtype, --device-map) and its
    `key=value`s (model_config's cfg and keys given: train.precision)."""
    precision_key = cfg.train.precision if "train.precision" in given else None
    return placement(args.adapter or args.model, args.device, args.dtype, args.device_map, precision_key)


def check_attention(name: str) -> None:
    """`model.attn_implementation`: one transformers knows (eager or a registered one), or a hub kernel
    (`org/repo`), checked before the model loads."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from chattune.errors import ConfigError

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
    if name not in known and "/" not in name:
        raise ConfigError(f"model.attn_implementation={name}: not an attention implementation transformers knows; "
                          f"choose from {', '.join(known)} (or a hub kernel, org/repo)")


def decode_step_choice(choice: str, cfg, log=print) -> str:
    """`--decode-step auto` becomes `transformers` where `model.attn_implementation` asks for an attention other
    than SDPA: chattune's own step (models/decode_step.py) attends through SDPA, so the key would not hold."""
    attention = cfg.model.attn_implementation
    if choice == "auto" and attention and attention != "sdpa":
        log(f"decode step: transformers' forward (model.attn_implementation={attention}; chattune's own step "
            "attends through SDPA)")
        return "transformers"
    return choice
