"""Every subcommand's --help prints (argparse formats every option) and explains every
option, and `modkern --help` lists every subcommand."""

from __future__ import annotations

import argparse

import pytest

from modkern.cli import COMMANDS, build_parser, main


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_prints_and_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = subparsers()[command]
    for action in parser._actions:
        assert action.help, f"modkern {command}: {action.option_strings or action.dest} " \
                            "has no help"
        for flag in action.option_strings:
            assert flag in text
    assert text.startswith(f"usage: modkern {command}")


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text
