"""`chattune chat (--adapter DIR | --model DIR) [--prompt TEXT] [key=value ...]`.

The `key=value` items are `train`'s `model.*` keys (`model.trust_remote_code=true`, `model.attn_implementation=
eager`): the model loads as it would for training; with --adapter the run's recorded settings are the default."""

from chattune.commands import add_block_weights_option, add_decode_step_option, add_device_options, add_overrides

HELP = "talk to a tuned or plain model in the terminal"

# Only the model.* keys (commands.MODEL_KEYS) apply; these say where the others' settings go instead.
KEYS: dict = {}
HINTS = {"template": "give it with --template", "data.system": "give it with --system",
         "train.precision": "give the dtype with --dtype"}


def configure(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="a chattune output_dir (adapter or full model) or a checkpoint in it")
    src.add_argument("--model", help="a full model folder, hub id, or `bundled` (default)")
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--template", help="override the template (default: the one the run used)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    add_device_options(p)
    add_block_weights_option(p)
    add_decode_step_option(p)
    add_overrides(p, KEYS, "model settings, as train takes them")


def load(args, log=print):
    """The model to chat with, loaded as the flags and `key=value` items say (a bad key fails before loading);
    `args.decode_step` becomes the decode step that will run (commands.decode_step_choice)."""
    from chattune.commands import command_placement, decode_step_choice, model_config
    from chattune.inference import load_tuned

    cfg, given, kwargs = model_config("chat", args.adapter, args.model, list(args.args), KEYS, hints=HINTS, log=log)
    args.decode_step = decode_step_choice(args.decode_step, cfg, log)
    kwargs.update(command_placement(args, cfg, given))
    return load_tuned(adapter=args.adapter, model=args.model, template=args.template, log=log,
                      packed=args.block_weights == "auto", **kwargs)


def run(args) -> int:
    from chattune.chat import answer_once, chat_loop
    from chattune.log import log

    tuned = load(args, log)
    if args.decode_step == "auto":
        from chattune.models.decode_step import enable_for_generate

        enable_for_generate(tuned.model, tuned.pad_id, log)
    if args.prompt is not None:
        print(answer_once(tuned, args.prompt, args.system, args.max_new_tokens, args.temperature))
        return 0
    chat_loop(tuned, args.system, args.max_new_tokens, args.temperature)
    return 0
