"""`chattune compare CONFIG.yaml [key=value ...]`."""

HELP = "train several methods on one dataset, evaluate each, and write a report (table, CSV, JSON, charts)"


def configure(p) -> None:
    p.add_argument("config", help="a compare config (e.g. compare_spo) or its path")
    p.add_argument("args", nargs="*", metavar="key=value", help="compare keys (output_dir, train_data, eval.batch_size, ...) or run-config keys applied to every variant")


def run(args) -> int:
    from chattune.compare import compare
    from chattune.log import log

    compare(args.config, args.args, log=log)
    return 0
