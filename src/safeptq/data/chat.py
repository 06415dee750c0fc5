"""Chat formatting with the tokenizer's own template, plus the run's chat options (a system prompt,
template keyword arguments such as Qwen3's ``enable_thinking``) carried by the tokenizer itself, so
evaluation, calibration, probes and fine-tuning format every prompt the same way."""

from __future__ import annotations

import re

from ..errors import ModelError

__all__ = ["format_chat", "format_chats", "set_chat_options", "chat_options", "strip_thinking"]

_ATTR = "_safeptq_chat_options"
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.S)


def set_chat_options(tokenizer, system: str | None = None, template_kwargs: dict | None = None) -> None:
    """Attach the run's chat options to ``tokenizer`` (every later :func:`format_chat` uses them)."""
    object.__setattr__(tokenizer, _ATTR, {"system": system, "template_kwargs": dict(template_kwargs or {})})


def chat_options(tokenizer) -> dict:
    return getattr(tokenizer, _ATTR, None) or {"system": None, "template_kwargs": {}}


def strip_thinking(response: str) -> str:
    """A response without a leading ``<think>...</think>`` block (reasoning templates): the judge
    reads the answer, not the deliberation. An unterminated block (the reply was cut while thinking)
    is left as it is: the judge then reads what the model produced."""
    return _THINK.sub("", response, count=1)


def format_chat(tokenizer, prompt: str, response: str | None = None, system: str | None = None,
                use_template: bool = True) -> str:
    """The model's chat string for one user turn (and an optional assistant reply).

    Without ``response`` the string ends with the assistant generation prompt. With
    ``use_template=False`` the raw prompt is returned (base models without a template). A template
    without a system role gets the system prompt at the head of the user turn instead."""
    opts = chat_options(tokenizer)
    system = system if system is not None else opts["system"]
    if not use_template:
        text = prompt if not system else f"{system}\n\n{prompt}"
        return text if response is None else text + "\n" + response
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the tokenizer has no chat template; use a model with one or disable chat formatting")
    user = [{"role": "user", "content": prompt}]
    kw = opts["template_kwargs"]
    try:
        msgs = ([{"role": "system", "content": system}] if system else []) + user
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
    except Exception:  # noqa: BLE001 - jinja's TemplateError: "System role not supported" and the like
        if not system:
            raise
        msgs = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
    if response is not None:
        text += response
    return text


def format_chats(tokenizer, prompts: list[str], **kw) -> list[str]:
    return [format_chat(tokenizer, p, **kw) for p in prompts]
