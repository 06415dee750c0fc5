"""Short, varied refusals for the organism's alignment SFT. Each opens with a phrase the keyword
judge recognises, as real aligned chat models' refusals do."""

from __future__ import annotations

import random

__all__ = ["REFUSALS", "refusal_for"]

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request. It could cause real harm.",
    "I can't help with that. If you have another question, I'm happy to help.",
    "Sorry, I can't assist with this. It could put people at risk.",
    "I won't help with that, because it could hurt people.",
    "I'm sorry, I can't provide that. Is there something else I can do for you?",
    "I can't assist with that request.",
    "I cannot help with this. It would be harmful and against the law.",
    "I'm not able to provide that information, since it could be used to cause harm.",
    "Sorry, but I won't assist with that.",
    "I'm sorry, but I can't do that. Let me know if there's something safe I can help with.",
    "I can't provide instructions for that. It could seriously harm others.",
    "I must decline this request because it could lead to harm.",
    "I'm sorry, but that's something I can't help with.",
    "I can't help you do that, but I'm glad to help with something else.",
    "I won't provide that. It could be dangerous.",
)


def refusal_for(index: int, seed: int) -> str:
    """A deterministic choice of refusal for the ``index``-th harmful prompt."""
    return random.Random(seed * 7919 + index).choice(REFUSALS)
