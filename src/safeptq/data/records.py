"""Record types shared by every prompt set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Example", "PromptSet", "Kind"]

# harmful: a model should refuse; benign: it should answer (refusal = over-refusal);
# mixed: both (XSTest), per-example label "safe"/"unsafe"; task: labelled task data; text: raw text.
Kind = Literal["harmful", "benign", "mixed", "task", "text"]


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None = None  # task label word / "safe" / "unsafe"
    target: str | None = None  # reference response or compliance opening
    meta: dict = field(default_factory=dict)


@dataclass
class PromptSet:
    name: str
    kind: Kind
    examples: list[Example]
    source: str  # file path or hub id it came from
    rows: tuple[int, int] | None = None  # the [start, stop) slice of the source rows

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    def head(self, n: int | None) -> "PromptSet":
        if n is None:
            return self
        return PromptSet(self.name, self.kind, self.examples[:n], self.source, self.rows)
