"""``safeptq ls``: list what the registries hold: methods, recipes' presets, schemes, suites."""

from __future__ import annotations

import argparse

from .base import Command
from .summary import print_table

__all__ = ["LsCommand"]


class LsCommand(Command):
    name = "ls"
    help = "list the methods, objectives, presets, schemes and suites / prompt sets"
    description = ("List every registered quantization method, objective, recipe preset, scheme preset and prompt set "
                   "(with its kind, rows and purpose).")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("what", nargs="?", default="all",
                       choices=("all", "methods", "objectives", "presets", "schemes", "suites"))

    def run(self, args: argparse.Namespace) -> int:
        from ..data import list_prompt_sets
        from ..methods import METHODS
        from ..objectives import OBJECTIVES
        from ..quant.args import SCHEMES
        from ..recipes import AAQ_PRESETS, SCHEDULES

        show = (lambda name: args.what in ("all", name))  # noqa: E731
        if show("methods"):
            print_table([[n, h] for n, h in METHODS.describe()], ["method", "description"])
            print()
        if show("objectives"):
            print_table([[n, h] for n, h in OBJECTIVES.describe()], ["objective", "description"])
            print()
        if show("presets"):
            print_table([["realign", n, "schedule"] for n in SCHEDULES] + [["aaq", n, "preset"] for n in AAQ_PRESETS],
                        ["method", "preset", "flag"])
            print()
        if show("schemes"):
            print_table([[n, h] for n, h in SCHEMES.describe()], ["scheme", "description"])
            print()
        if show("suites"):
            rows = [[s.name, s.kind, f"{s.rows[0]}-{s.rows[1] - 1}" if s.rows else "all", s.description]
                    for s in list_prompt_sets()]
            from ..eval.suite import SUITE_GROUPS

            rows += [[g, "group", "-", "= " + ",".join(members)] for g, members in SUITE_GROUPS.items()]
            print_table(rows, ["name", "kind", "rows", "description"])
        return 0
