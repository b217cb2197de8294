"""chattune: fine-tune chat LLMs on your own conversations."""

__version__ = "0.1.0"
