"""User-facing errors.

Everything a user can get wrong (config, data, model path, method/hardware combination) is raised as a
`ChattuneError` at the edge; the CLI prints its message without a traceback and exits with code 2.
"""


class ChattuneError(Exception):
    """An error caused by user input. The message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(ChattuneError):
    pass


class DataError(ChattuneError):
    """One or more invalid records. `problems` holds one `file:line: field: what is wrong` string each."""

    def __init__(self, problems: list[str], hint: str = ""):
        self.problems, self.hint = list(problems), hint
        shown = self.problems[:50]
        more = len(self.problems) - len(shown)
        lines = shown + ([f"... and {more} more problems"] if more > 0 else [])
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class ModelError(ChattuneError):
    pass


class MethodError(ChattuneError):
    pass


def remote_code_failure(e: BaseException) -> "ModelError | None":
    """A ModelError naming the call that failed inside a model's own (remote) code, or None when the error did not
    come from such code. Remote code written for older transformers breaks under newer ones in many ways (a missing
    config attribute, a changed cache object or keyword); the user's way out is a native implementation or the
    model's updated revision, never a traceback from inside its files."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "transformers_modules" in f.filename.replace("\\", "/")]
    if not frames:
        return None
    where = frames[-1]
    from pathlib import Path

    import transformers

    return ModelError(
        f"the model's own code fails under transformers {transformers.__version__}: {Path(where.filename).name}, line "
        f"{where.lineno}, in {where.name}: {type(e).__name__}: {e}\nfix: download the publisher's updated revision "
        "of the model (if it has one) and point model= at it, or use a version of the model that transformers "
        "implements (chattune converts ChatGLM2/3 and GLM-4 checkpoints itself and never runs their code)")
