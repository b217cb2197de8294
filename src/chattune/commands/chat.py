"""`chattune chat (--adapter DIR | --model DIR) [--prompt TEXT]`."""

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
    p.add_argument("--packed", choices=["auto", "off"], default="auto",
                   help="auto (default): on a CPU, decode layers whose fp32 weights are exactly 4-/8-bit blocks "
                        "(the bundled model's) from those blocks; off: torch's fp32 matmuls everywhere")


def run(args) -> int:
    from chattune.chat import answer_once, chat_loop
    from chattune.inference import load_tuned
    from chattune.log import log

    tuned = load_tuned(adapter=args.adapter, model=args.model, template=args.template, log=log)
    if args.packed == "auto":
        from chattune.models.packed import enable

        enable(tuned.model, log)
    if args.prompt is not None:
        print(answer_once(tuned, args.prompt, args.system, args.max_new_tokens, args.temperature))
        return 0
    chat_loop(tuned, args.system, args.max_new_tokens, args.temperature)
    return 0
