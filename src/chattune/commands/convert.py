"""`chattune convert SRC OUT`: a seed checkpoint (ChatGLM-6B, ChatGLM2/3, GLM-4, TransNormerLLM) as a folder that
runs without its remote code."""

HELP = ("convert a ChatGLM-6B/ChatGLM2/ChatGLM3/GLM-4/TransNormerLLM checkpoint into a folder that runs without its "
        "remote code (GLM2/3/4: transformers' GlmForCausalLM; ChatGLM-6B, TransNormerLLM: chattune's own models)")


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
        raise ModelError(f"{src} is not a ChatGLM-6B/ChatGLM2/ChatGLM3/GLM-4/TransNormerLLM checkpoint (model_type "
                         f"{config['model_type']!r}); convert only rewrites those\nfix: use the folder as it is: "
                         f"model={src}")
    family = native.family_of(src)
    out = native.write_native(src, Path(args.out), log)
    where = ("with plain transformers" if family == "glm" else
             "with transformers once chattune is imported (it registers the model type)")
    log(f"converted: {out} loads {where} (AutoModelForCausalLM, AutoTokenizer), no trust_remote_code; use it as "
        f"model={out}")
    return 0
