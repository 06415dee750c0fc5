"""Flags ↔ recipe fields. A recipe flag's ``dest`` is ``r:`` + the field's dotted name
(``r:training.lr_lwc``) and its default is ``None``, so only what the user typed overrides the
recipe (whose defaults and presets live in :mod:`safeptq.recipes` alone); run-time flags
(``o:device``) fill :class:`~safeptq.methods.RunOptions`. Errors that name a field are printed with
its flag instead."""

from __future__ import annotations

import argparse
import re

from ..errors import SafePTQError

__all__ = ["add_chat_flags", "json_object", "recipe_flag", "option_flag", "recipe_overrides", "run_options", "flag_message", "default_text"]

R, O = "r:", "o:"


def _metavar(field: str, kw: dict) -> dict:
    if kw.get("action") in (None, "store") and "choices" not in kw and "metavar" not in kw:
        kw["metavar"] = field.rsplit(".", 1)[-1].upper()
    return kw


def recipe_flag(g, *names: str, field: str, **kw) -> None:
    """A flag that sets recipe field ``field`` (dotted) when given."""
    g.add_argument(*names, dest=R + field, default=None, **_metavar(field, kw))


def option_flag(g, *names: str, field: str, default=None, **kw) -> None:
    """A flag that sets :class:`~safeptq.methods.RunOptions` field ``field``."""
    g.add_argument(*names, dest=O + field, default=default, **_metavar(field, kw))


def json_object(text: str) -> dict:
    """argparse type of ``--chat-template-kwargs``: a JSON object."""
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as {{\"enable_thinking\": false}}, got {text}")
    return value


def add_chat_flags(g, recipe: bool = True) -> None:
    """``--system-prompt`` and ``--chat-template-kwargs``: applied to every chat-formatted prompt."""
    add = (lambda *n, field, **kw: recipe_flag(g, *n, field=field, **kw)) if recipe else \
        (lambda *n, field, **kw: g.add_argument(*n, dest=field, default=None, **kw))
    add("--system-prompt", field="system_prompt", metavar="TEXT",
        help="system prompt for every chat-formatted prompt (evaluation, calibration, probes); templates without "
             "a system role get it at the head of the user turn; recorded")
    add("--chat-template-kwargs", field="chat_template_kwargs", type=json_object, metavar="JSON",
        help='keyword arguments of the chat template, e.g. \'{"enable_thinking": false}\' (Qwen3); recorded')


def recipe_overrides(args: argparse.Namespace) -> dict:
    return {k[len(R):]: v for k, v in vars(args).items() if k.startswith(R) and v is not None}


def run_options(args: argparse.Namespace):
    from ..methods import RunOptions

    return RunOptions(**{k[len(O):]: v for k, v in vars(args).items() if k.startswith(O) and v is not None})


def default_text(cls, path: str) -> str:
    """The default of a recipe field for ``--help``, read from the recipe class itself."""
    obj = cls
    *heads, leaf = path.split(".")
    from ..recipes.base import section_type

    for h in heads:
        obj = section_type(obj.model_fields[h].annotation)
    f = obj.model_fields[leaf]
    v = f.get_default(call_default_factory=True)
    if isinstance(v, bool):
        return "default on" if v else "default off"
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``{dotted field: --flag}`` of a sub-command's recipe and option flags (longest name)."""
    out = {}
    for a in parser._actions:
        if a.option_strings:
            key = a.dest[2:] if a.dest.startswith((R, O)) else a.dest
            out.setdefault(key, max(a.option_strings, key=len))
    return out


def flag_message(err: SafePTQError, parser: argparse.ArgumentParser | None) -> str:
    """The error's message with recipe field names replaced by the flags that set them."""
    from ..recipes.base import RecipeError

    msg = str(err)
    if parser is None:
        return msg
    flags = _flags(parser)
    if isinstance(err, RecipeError):
        msg = err.detail
        if err.field and "`" not in msg:
            flag = flags.get(err.field)
            msg = f"{flag or err.field} {msg}" if not msg.startswith(err.field) else msg
    return re.sub(r"`([\w.]+)`", lambda m: flags.get(m.group(1), m.group(1)), msg)
