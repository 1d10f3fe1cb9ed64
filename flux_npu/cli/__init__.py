"""The `flux-npu` command line: `flux-npu <command> [options]`.

Each command lives in its own module of this package exposing `register(subparsers)`, which adds
its parser and sets `func` (args -> exit code). COMMANDS lists them in help order.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("info", "demo", "run", "ds_config", "parity", "bench", "verify")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="flux-npu",
        description="Run unchanged Flux code on Ascend NPU, CUDA and CPU: backends, patches, parity, benchmarks.",
        epilog="Conventions: results go to a file with -o/--output PATH; --json prints JSON to stdout; lists take "
               "spaces or commas; --backend must name a registered backend. Exit status: 0 success, 1 error (one "
               "line on stderr; -v shows the traceback), 2 bad usage; `run` returns the script's own status.",
    )
    parser.add_argument("--version", action="version", version=f"flux-npu {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend selection and patching")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # command not built in this version
            raise
        mod.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as exc:  # OSError: unreadable / unwritable files
        if args.verbose:
            raise
        print(f"flux-npu {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
