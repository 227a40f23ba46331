"""The ``dinollama`` command."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import code, demo, evaluate, serve, train, vision


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the mistake and where to read more, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's default in ``--help``, on every subcommand (argparse shows none by itself)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _show_defaults(sub)
            continue
        d = action.default
        shown = action.option_strings and not (d is None or d is False or d is argparse.SUPPRESS or d == [])
        if shown and "%(default)" not in (action.help or "") and action.help != argparse.SUPPRESS:
            action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dinollama",
        description="DINOv2 vision backbones and Code Llama in plain PyTorch.",
        epilog="Run 'dinollama COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"dinollama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    vision.register(sub)
    code.register(sub)
    evaluate.register(sub)
    train.register(sub)
    demo.register(sub)
    serve.register(sub)
    _show_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..data import ImageLoadError
    from ..distributed import teardown
    from ..dinov2.train import TrainingError
    from ..io import CheckpointError, OfflineError
    from ..memory import keep_freed_memory

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:  # 'dinollama' alone
        parser.print_help()
        return 0
    keep_freed_memory()  # every command is a long job over large tensors
    code = 1
    try:
        code = args.func(args) or 0
        return code
    except (CheckpointError, OfflineError, ImageLoadError, OSError, ValueError, TrainingError, MemoryError) as e:
        print(f"dinollama {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        teardown(synchronize=code == 0)


def _one_line(e: BaseException, width: int = 400) -> str:
    """The message on one line; an over-long one (a file name that was a whole prompt) is shortened."""
    text = str(e)
    if isinstance(e, OSError) and e.filename is not None and e.strerror:  # "[Errno 13] ...: 'x'" -> "x: ..."
        name = " ".join(str(e.filename).split())
        text = f"{name if len(name) < 200 else name[:100] + ' ... ' + name[-40:]}: {e.strerror.lower()}"
    text = " ".join(text.split()) or type(e).__name__
    return text if len(text) <= width else text[: width - 60] + " ... " + text[-55:]


if __name__ == "__main__":
    sys.exit(main())
