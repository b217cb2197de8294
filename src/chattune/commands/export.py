"""`chattune export --adapter DIR --out DIR` (a plain HF model folder), or `chattune export --format gguf
--quant Q (--adapter DIR | --model DIR) --out DIR` (one GGUF file and an Ollama Modelfile, chattune.export_gguf)."""

from chattune.commands import add_device_options
from chattune.errors import ConfigError

HELP = "merge an adapter into its base model and save a plain HF model folder, or a GGUF file for llama.cpp/Ollama"


def configure(p) -> None:
    from chattune.export_gguf import QUANTS

    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="a chattune output_dir (adapter or full model) or a checkpoint in it")
    src.add_argument("--model", help="--format gguf only: a plain model folder, hub id in the cache, or `bundled`")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: a Hugging Face model folder (default); gguf: OUT/model-<quant>.gguf + OUT/Modelfile")
    p.add_argument("--quant", choices=QUANTS, help="--format gguf only: the weights' precision (default f16)")
    add_device_options(p, device_map=False, device_default="cpu",
                       dtype_help="--format hf: the dtype the merged model is saved in: auto (the base model's own), "
                                  "fp32, bf16, fp16; the merge itself runs in fp32 on --device")


def run(args) -> int:
    from chattune.log import log

    if args.format == "gguf":
        from chattune.export_gguf import export_gguf

        if args.device != "cpu" or args.dtype != "auto":
            flag = f"--dtype {args.dtype}" if args.dtype != "auto" else f"--device {args.device}"
            raise ConfigError(f"{flag} is for --format hf (the merge); --format gguf sets its precision with --quant")
        if args.adapter is None and args.model is None:
            raise ConfigError("export --format gguf needs --adapter RUN (a chattune output folder) or --model PATH "
                              "(a plain model folder, or `bundled`)")
        export_gguf(args.adapter, args.out, args.quant or "f16", model=args.model, log=log)
        return 0
    from chattune.export import export

    if args.model is not None or args.quant is not None:
        flag = "--model" if args.model is not None else "--quant"
        raise ConfigError(f"{flag} is for --format gguf; --format hf (the default) merges a run given with --adapter")
    if args.adapter is None:
        raise ConfigError("export needs --adapter DIR (a chattune output folder)")
    export(args.adapter, args.out, log=log, device=args.device, dtype=args.dtype)
    return 0
