"""The `voxseg` command: thin subcommands that parse flags, call the API and print.

One module per command group (`data`, `train`, `infer`, `imports`, `speed`); `derive` turns config fields into flags.
Errors a user can cause (VoxsegError) are printed without a traceback and exit with a non-zero code.
"""
from __future__ import annotations

import argparse
import sys

from voxseg.cli.common import DeferredParser, examples
from voxseg.cli.data import add_data_commands
from voxseg.cli.imports import add_import_commands
from voxseg.cli.infer import add_infer_commands
from voxseg.cli.report import add_report_command
from voxseg.cli.serve import add_serve_command
from voxseg.cli.speed import add_speed_commands
from voxseg.cli.train import add_train_command
from voxseg.errors import VoxsegError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxseg", description="Fast 3D medical image segmentation on nnU-Net-format datasets.",
        epilog=examples("voxseg demo\n"
                        "voxseg plan DATASET -o WORKDIR && voxseg preprocess WORKDIR && voxseg train WORKDIR --fold 0"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from voxseg import __version__

    parser.add_argument("--version", action="version", version=f"voxseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=DeferredParser)
    add_data_commands(sub)
    add_train_command(sub)
    add_infer_commands(sub)
    add_report_command(sub)
    add_serve_command(sub)
    add_import_commands(sub)
    add_speed_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that relaunch themselves
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except VoxsegError as exc:
        print(f"voxseg {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # what the operating system refused, with the path and the cause, never a traceback
        from voxseg.atomicio import os_error_message

        print(f"voxseg {args.command}: error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"voxseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
