"""`chattune eval (--adapter DIR | --model DIR) --data FILE [--metrics ...] [key=value ...]`.

The `key=value` items: the KEYS below and `train`'s `model.*` keys (commands.MODEL_KEYS)."""

from chattune.commands import add_block_weights_option, add_decode_step_option, add_device_options, add_overrides

HELP = "score a model on a data file: ROUGE-1/2/L, BLEU-4, exact match, triple F1, loss; writes predictions"

# The run-config keys that change what `eval` does besides the model.* ones (the others are refused, never ignored).
KEYS = {
    "template": "the chat template (default: the one the run used; --template is the same)",
    "model.trust_remote_code": "load a remote-code model (default: as the run did)",
    "train.precision": "the same as --dtype: auto (default), fp32, bf16, fp16",
    "data.format": "the data file's format (default: auto)",
    "data.skip_invalid": "score the valid records and report the invalid ones instead of stopping",
    "data.system": "the system prompt for records that have none (default: the run's)",
    "data.columns": "the data's column for a format field, e.g. data.columns.output=answer (docs/data.md)",
    "data.max_length": "the loss metric: records longer than this are cut as in training (default: the run's)",
    "data.truncation": "the loss metric: how an over-long record is cut (default: the run's)",
    "data.train_on": "the loss metric: all assistant turns or only the last (default: the run's)",
}
# Keys that start from the run's recorded config.yaml (the others describe a data file, not the run).
INHERITED = ("data.system", "data.max_length", "data.truncation", "data.train_on")
LOSS_KEYS = ("data.max_length", "data.truncation", "data.train_on")
HINTS = {"model.path": "give the model with --model or --adapter", "data.train": "give the file with --data",
         "data.eval": "give the file with --data"}


def configure(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="a chattune output_dir (adapter or full model) or a checkpoint in it")
    src.add_argument("--model", help="a model folder, hub id, or `bundled` (default)")
    p.add_argument("--data", required=True, help="records in any supported format; the last assistant turn is scored")
    p.add_argument("--metrics", default="rouge,bleu", help="comma-separated: rouge, bleu, exact, triple_f1, loss")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--template", help="override the template (default: the one the run used); = template=NAME")
    p.add_argument("--out", help="output folder (default: MODEL_DIR/eval-<data file stem>)")
    add_device_options(p)
    add_block_weights_option(p, default="off")
    add_decode_step_option(p, default="transformers")
    add_overrides(p, KEYS, "run-config overrides, starting from the run's config.yaml")


def run(args) -> int:
    from chattune.commands import command_placement, decode_step_choice, model_config
    from chattune.errors import ConfigError
    from chattune.evaluate.metrics import parse_metric_names
    from chattune.evaluate.run import evaluate
    from chattune.log import log

    overrides = ([f"template={args.template}"] if args.template else []) + list(args.args)
    names = parse_metric_names(args.metrics)
    cfg, given, load = model_config("eval", args.adapter, args.model, overrides, KEYS, INHERITED, HINTS, log=log)
    loss_only = [k for k in given if k in LOSS_KEYS]
    if loss_only and "loss" not in names:
        raise ConfigError(f"{', '.join(loss_only)}: only the loss metric encodes whole records (generation prompts "
                          f"are cut only to the model's context); add loss to --metrics (now {','.join(names)}) or "
                          f"leave {'it' if len(loss_only) == 1 else 'them'} out")
    decode_step = decode_step_choice(args.decode_step, cfg, log)
    load.update(command_placement(args, cfg, given))
    evaluate(args.adapter, args.model, args.data, names, args.batch_size, args.max_new_tokens, args.limit,
             args.out, log=log, data_config=cfg.data, packed=args.block_weights == "auto",
             decode_step=decode_step == "auto", **load)
    return 0
