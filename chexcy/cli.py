"""The `chexcy` command: one sub-command per job.

Each area registers its own sub-commands (``register(subparsers)``) and imports its heavy modules
only when its command runs, so `chexcy --help` stays instant.
"""
import argparse
import sys

from chexcy import __version__
from chexcy.fileio import DamagedFileError, DiskFullError
from chexcy.locks import FolderLockError


def build_parser():
    parser = argparse.ArgumentParser(
        prog="chexcy",
        description="Train and run from-scratch CNNs on CheXpert chest X-rays.")
    parser.add_argument("--version", action="version", version=f"chexcy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from chexcy import info
    info.register(sub)
    from chexcy.data import commands as data_commands
    data_commands.register(sub)
    from chexcy import commands as train_commands
    train_commands.register(sub)
    parser.subcommands = sub.choices          # name -> its parser, for errors found after it parsed
    return parser


def parse(parser, argv=None):
    """Parse argv; an option the sub-command does not know is reported with that sub-command's usage
    (argparse would print the top-level one, which does not list the sub-command's options). Exits 2."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv=None):
    parser = build_parser()
    args = parse(parser, argv)
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        print("chexcy: interrupted", file=sys.stderr)
        return 130
    except (DamagedFileError, DiskFullError, FolderLockError) as exc:
        # The command was right, a file or the machine was not: a failure (1), in one line.
        message = exc.strerror if isinstance(exc, DiskFullError) else exc
        print(f"chexcy {args.command}: error: {message}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        # Expected failures (bad arguments, bad files) end with one clear line, not a traceback.
        print(f"chexcy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The system refused (a full disk, no permission, a read-only file system): one line, status 1.
        # chexcy.fileio.DiskFullError already says which file and that the previous one is intact.
        print(f"chexcy {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
