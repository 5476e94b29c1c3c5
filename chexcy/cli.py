"""The `chexcy` command: one sub-command per job.

Each area registers its own sub-commands (``register(subparsers)``) and imports its heavy modules
only when its command runs, so `chexcy --help` stays instant.
"""
import argparse
import sys

from chexcy import __version__


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
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        # Expected failures (bad arguments, bad files, a full disk) end with one clear line, not a traceback.
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror and not exc.filename else exc
        print(f"chexcy {args.command}: error: {text}", file=sys.stderr)
        return 1 if _is_failure(exc) else 2
    return int(status or 0)


def _is_failure(exc):
    """Exit status 1 (the command failed) rather than 2 (it was called wrongly): a damaged file, a full
    disk, a folder locked by another process, any other error of the operating system."""
    from chexcy.fileio import DamagedFileError
    from chexcy.locks import FolderLockError
    from chexcy.runfolder import RunFolderBusy
    if isinstance(exc, (FileNotFoundError, FileExistsError)):
        return False
    return isinstance(exc, (DamagedFileError, FolderLockError, RunFolderBusy, OSError))


if __name__ == "__main__":
    sys.exit(main())
