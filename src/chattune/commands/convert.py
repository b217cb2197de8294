"""`chattune convert SRC OUT`: a ChatGLM2/3 or GLM-4 checkpoint as a native transformers folder."""

HELP = "convert a ChatGLM2/ChatGLM3/GLM-4 checkpoint into a transformers GlmForCausalLM folder (no remote code)"


def configure(p) -> None:
    p.add_argument("src", help="the checkpoint folder as published (config.json with model_type chatglm)")
    p.add_argument("out", help="a new folder (absent or empty) for the converted model, tokenizer and template")


def run(args) -> int:
    from pathlib import Path

    from chattune.errors import ModelError
    from chattune.log import log
    from chattune.models import native
    from chattune.models.load import read_config

    src = Path(args.src)
    if not src.is_dir():
        raise ModelError(f"{src} is not a folder\nfix: give the checkpoint folder that holds config.json")
    config = read_config(src)
    if native.family_of(src) is None:
        raise ModelError(f"{src} is not a ChatGLM2/ChatGLM3/GLM-4 checkpoint (model_type {config['model_type']!r}); "
                         "convert only rewrites those\nfix: use the folder as it is: model=" + str(src))
    out = native.write_native(src, Path(args.out), log)
    log(f"converted: {out} loads with plain transformers (AutoModelForCausalLM, AutoTokenizer), no "
        "trust_remote_code; use it as model=" + str(out))
    return 0
