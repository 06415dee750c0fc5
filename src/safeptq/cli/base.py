"""Sub-command base class. Heavy imports live inside ``run`` so that ``safeptq --help`` answers at once."""

from __future__ import annotations

import argparse

__all__ = ["Command"]


class Command:
    name: str = ""
    help: str = ""
    description: str = ""
    epilog: str = ""
    parser: argparse.ArgumentParser | None = None  # set by build_parser (flag names for error messages)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError
