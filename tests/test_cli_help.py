"""`chexcy <command> --help` for every sub-command: every option explained, every default shown, no
format escapes printed literally; a wrong option answered with the sub-command's own usage; --threads
beyond the cores warned about; a command's failure ends in one line on stderr and an exit status."""
import argparse

import pytest

from chexcy import cli, commands

PARSER = cli.build_parser()
PARSERS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices
SUBCOMMANDS = sorted(PARSERS)

# Arguments each sub-command requires, so that only the option under test is wrong.
REQUIRED = {
    "synth": ["--out", "o"],
    "prepare": ["x.csv", "--out", "o"],
    "train": ["--data", "d"],
    "evaluate": ["--checkpoint", "c.npz", "--data", "d"],
    "predict": ["--checkpoint", "c.npz", "image.png"],
    "export": ["c.npz"],
}


def options(name):
    return [a for a in PARSERS[name]._actions if not isinstance(a, argparse._HelpAction)]


def test_every_subcommand_is_covered():
    assert set(SUBCOMMANDS) == {"info", "synth", "prepare", "train", "evaluate", "predict", "export",
                                "demo"}


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_explains_every_option_and_shows_its_default(name):
    sub = PARSERS[name]
    text = sub.format_help()
    assert "%%" not in text and "%(" not in text, f"`chexcy {name} --help` prints a format escape:\n{text}"
    for action in options(name):
        label = "/".join(action.option_strings) or action.dest
        assert action.help, f"chexcy {name}: {label} has no help text"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in action.help, \
                f"chexcy {name}: {label} defaults to {action.default!r} but its help does not say so: {action.help!r}"


def test_evaluate_help_prints_one_percent_sign():
    text = PARSERS["evaluate"].format_help()
    assert "95% intervals" in " ".join(text.split()) and "95% CIs" in text


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_unknown_option_shows_the_subcommands_usage(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([name, *REQUIRED.get(name, []), "--no-such-option"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: chexcy {name} "), err
    assert "unrecognized arguments: --no-such-option" in err


@pytest.mark.parametrize("name", ["train", "evaluate", "predict", "demo"])
def test_more_threads_than_cores_is_warned_about(name, capsys):
    cores = commands.cores_available()
    args = PARSER.parse_args([name, *REQUIRED.get(name, []), "--threads", str(cores + 62)])
    assert args.threads == cores + 62                     # allowed: the user may know better
    err = capsys.readouterr().err
    assert f"--threads {cores + 62} is more than the {cores} core(s)" in err, err
    PARSER.parse_args([name, *REQUIRED.get(name, []), "--threads", str(cores)])
    assert capsys.readouterr().err == ""
    assert f"{cores} here" in " ".join(PARSERS[name].format_help().split())


@pytest.mark.parametrize("name", ["train", "evaluate", "predict", "demo"])
def test_zero_threads_is_a_usage_error(name, capsys):
    with pytest.raises(SystemExit) as stop:
        PARSER.parse_args([name, *REQUIRED.get(name, []), "--threads", "0"])
    assert stop.value.code == 2 and "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("error, status", [
    (lambda: __import__("chexcy.fileio").fileio.DiskFullError(28, "disk full while writing x.json; the "
                                                                   "previous x.json is intact"), 1),
    (lambda: PermissionError(13, "Permission denied", "out/x.json"), 1),
    (lambda: ValueError("--bootstrap must be >= 0"), 2),
], ids=["disk-full", "permission", "bad-value"])
def test_failures_of_a_command_are_one_line_with_a_status(error, status, monkeypatch, capsys):
    def fail(args):
        raise error()
    monkeypatch.setattr(commands, "run_evaluate", fail)     # read when the parser is built
    assert cli.main(["evaluate", "--checkpoint", "c.npz", "--data", "d"]) == status
    err = capsys.readouterr().err
    assert err.startswith("chexcy evaluate: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
