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
        self.problems = list(problems)
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
