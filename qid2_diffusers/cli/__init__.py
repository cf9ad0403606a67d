"""The ``qid2`` command line.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and a
``run(args)``; errors the user can fix are raised as :class:`QID2InputError`
and printed as one line, never a traceback; input used but not as given
(:class:`QID2InputWarning`) is printed as one warning line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ..errors import QID2InputError, QID2InputWarning

__all__ = ["main", "build_parser"]

#: Subcommand modules, in the order ``qid2 --help`` lists them.
SUBCOMMANDS = ["phantom", "upsample", "evaluate", "benchmark", "push"]


def _load(name: str):
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        # A subcommand whose module has not been written yet is simply absent.
        if exc.name == f"{__name__}.{name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="qid2",
        description="Q-space up-sampling of diffusion MRI with QID² (image-conditioned diffusion).",
    )
    parser.add_argument("--version", action="version", version=f"qid2-diffusers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = _load(name)
        if module is not None:
            module.add_parser(sub)
    return parser


def _one_line_warnings(command: str):
    """A ``warnings.showwarning`` that prints input warnings as ``qid2 COMMAND: warning: ...``."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, QID2InputWarning):
            print(f"qid2 {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that describe their outputs
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", QID2InputWarning)
            warnings.showwarning = _one_line_warnings(args.command)
            return int(args.run(args) or 0)
    except QID2InputError as exc:
        print(f"qid2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qid2 {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down the process group of an ``accelerate launch`` run before the interpreter exits.

    Left to interpreter shutdown, gloo's threads can be destroyed while still joinable, and a
    worker that had finished its share aborted ("terminate called without an active exception",
    SIGABRT), failing the whole launch. No barrier: a process leaving on an input error must not
    wait for one that never reaches it.
    """
    distributed = sys.modules.get("torch.distributed")  # never imports torch for a command that did not
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
