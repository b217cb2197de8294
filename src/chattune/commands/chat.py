"""`chattune chat (--adapter DIR | --model DIR) [--prompt TEXT]`."""

from chattune.commands import add_decode_step_option, add_packed_option

HELP = "talk to a tuned or plain model in the terminal"


def configure(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="an adapter folder (a chattune output_dir)")
    src.add_argument("--model", help="a full model folder, hub id, or `bundled` (default)")
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--template", help="override the template (default: the one the run used)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    add_packed_option(p)
    add_decode_step_option(p)


def run(args) -> int:
    from chattune.chat import answer_once, chat_loop
    from chattune.inference import load_tuned
    from chattune.log import log

    tuned = load_tuned(adapter=args.adapter, model=args.model, template=args.template, log=log,
                       packed=args.packed == "auto")
    if args.decode_step == "auto":
        from chattune.models.decode_step import enable_for_generate

        enable_for_generate(tuned.model, tuned.pad_id, log)
    if args.prompt is not None:
        print(answer_once(tuned, args.prompt, args.system, args.max_new_tokens, args.temperature))
        return 0
    chat_loop(tuned, args.system, args.max_new_tokens, args.temperature)
    return 0
