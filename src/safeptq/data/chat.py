"""Chat formatting with the tokenizer's own template."""

from __future__ import annotations

from ..errors import ModelError

__all__ = ["format_chat", "format_chats"]


def format_chat(tokenizer, prompt: str, response: str | None = None, system: str | None = None,
                use_template: bool = True) -> str:
    """The model's chat string for one user turn (and an optional assistant reply).

    Without ``response`` the string ends with the assistant generation prompt. With
    ``use_template=False`` the raw prompt is returned (base models without a template)."""
    if not use_template:
        return prompt if response is None else prompt + "\n" + response
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the tokenizer has no chat template; use a model with one or disable chat formatting")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if response is not None:
        text += response
    return text


def format_chats(tokenizer, prompts: list[str], **kw) -> list[str]:
    return [format_chat(tokenizer, p, **kw) for p in prompts]
