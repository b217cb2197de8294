"""`chattune export --adapter DIR --out DIR`."""

HELP = "merge an adapter into its base model and save a plain HF model folder"


def configure(p) -> None:
    p.add_argument("--adapter", required=True,
                   help="a chattune output_dir (adapter or full model) or a checkpoint in it")
    p.add_argument("--out", required=True)


def run(args) -> int:
    from chattune.export import export
    from chattune.log import log

    export(args.adapter, args.out, log=log)
    return 0
