"""`chattune estimate [CONFIG] [key=value ...] [--gpus N] [--gpu-memory 24GB] [--json]`."""

HELP = "estimate a run's memory per device (weights, gradients, optimizer, activations, logits) before training"


def configure(p) -> None:
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value",
                   help="the same keys as `train`; model= may also be a config.json or a shipped model name")
    p.add_argument("--gpus", type=int, default=None, help="GPUs the run uses (ZeRO shards over them)")
    p.add_argument("--gpu-memory", default=None, help="memory of one device, e.g. 24GB or 80GiB: says if it fits")
    p.add_argument("--json", action="store_true", help="print one JSON object (with total_bytes)")


# The run-config keys the estimate reads (a key given on the command line outside these would change nothing, so it
# is refused); every key of a method's own section (lora.*, prefix.*, ...) counts, as they decide what trains; one of
# a section the run's method does not read is refused by config_from_args, as `train` refuses it.
ESTIMATE_KEYS = ("model", "method", "data.max_length", "train.batch_size", "train.precision",
                 "train.gradient_checkpointing", "train.label_only_logits", "train.compile", "train.max_steps",
                 "train.deepspeed", "train.fsdp", "train.fsdp_config")


def check_keys(overrides: list[str]) -> None:
    """Refuse a given key the estimate does not read, naming those it does (config.check_command_keys)."""
    from chattune.config import check_command_keys
    from chattune.methods import REGISTRY

    sections = [f"{m.section}.*" for m in REGISTRY.values() if m.section]
    check_command_keys("estimate", overrides, (*ESTIMATE_KEYS, "model.*", *sections))


def run(args) -> int:
    import json

    from chattune.config import config_from_args, split_config_arg
    from chattune.estimate import estimate, format_estimate, parse_size
    from chattune.log import log

    check_keys(split_config_arg(args.args)[1])
    cfg = config_from_args(args.args)
    e = estimate(cfg, args.gpus, parse_size(args.gpu_memory) if args.gpu_memory else None, log=log)
    print(json.dumps(e.to_json(), indent=2) if args.json else format_estimate(e))
    return 0
