"""The ``dinollama`` command."""

from __future__ import annotations

import argparse
import sys

from . import code, demo, evaluate, train, vision


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinollama",
        description="DINOv2 vision backbones and Code Llama in plain PyTorch.",
        epilog="Run 'dinollama COMMAND --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    vision.register(sub)
    code.register(sub)
    evaluate.register(sub)
    train.register(sub)
    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..data import ImageLoadError
    from ..dinov2.train import TrainingError
    from ..io import CheckpointError, OfflineError
    from ..memory import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # every command is a long job over large tensors
    try:
        return args.func(args) or 0
    except (CheckpointError, OfflineError, ImageLoadError, FileNotFoundError, ValueError, TrainingError) as e:
        print(f"dinollama {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
