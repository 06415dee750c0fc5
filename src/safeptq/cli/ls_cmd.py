"""``safeptq ls``: list the registered prompt sets (and, as they are added, methods and schemes)."""

from __future__ import annotations

import argparse

from .base import Command, print_table

__all__ = ["LsCommand"]


class LsCommand(Command):
    name = "ls"
    help = "list the known suites / prompt sets and scheme presets"
    description = "List every registered prompt set with its kind, rows and purpose, and the scheme presets."

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        from ..data import list_prompt_sets

        rows = []
        for s in list_prompt_sets():
            rows.append([s.name, s.kind, f"{s.rows[0]}-{s.rows[1] - 1}" if s.rows else "all", s.description])
        print_table(rows, ["name", "kind", "rows", "description"])
        try:
            from ..quant.args import PRESETS
            print("\nscheme presets: " + ", ".join(sorted(PRESETS)))
        except ImportError:
            pass
        return 0
