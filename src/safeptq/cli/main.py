"""The ``safeptq`` command. User errors print one line on stderr and exit with code 2."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from .aaq_cmd import AAQCommand
from .base import Command
from .compare_cmd import CompareCommand
from .demo_cmd import DemoCommand
from .eval_cmd import EvalCommand
from .judge_cmd import JudgeCommand
from .ls_cmd import LsCommand
from .organism_cmd import OrganismCommand
from .probe_cmd import ProbeCommand
from .quantize_cmd import QuantizeCommand
from .realign_cmd import RealignCommand
from .report_cmd import ReportCommand
from .run_cmd import RunCommand

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS: list[Command] = [EvalCommand(), JudgeCommand(), CompareCommand(), LsCommand(), OrganismCommand(), QuantizeCommand(),
                           RealignCommand(), AAQCommand(), RunCommand(), ProbeCommand(),
                           ReportCommand(), DemoCommand()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="safeptq",
        description="Safety-aware post-training quantization of Hugging Face causal LMs: quantize a model "
                    "so that it keeps (AAQ) or regains (Q-realign) its refusals, and measure safety, "
                    "over-refusal, task skill and perplexity. Every command is a thin shell over the Python "
                    "API (import safeptq).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"safeptq {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description, epilog=cmd.epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(sp)
        cmd.parser = sp
        sp.set_defaults(_cmd=cmd)
    return p


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler stopping the job) takes the Ctrl-C path: staging folders removed, locks
    released, the work folder and the --resume command named."""
    import os
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        owner = os.getpid()

        def handler(signum, frame):
            if os.getpid() != owner:  # a forked worker (datasets, lm-eval) inherited it: die as it would have
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_cmd", None):
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ..errors import SafePTQError
    from .flags import flag_message

    _sigterm_as_interrupt()
    try:
        return args._cmd.run(args)
    except SafePTQError as e:
        print(f"safeptq: error: {flag_message(e, args._cmd.parser)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safeptq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
