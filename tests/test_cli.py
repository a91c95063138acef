"""Every command of the ``featcache`` group: ``--help`` works, says what the command does, documents each option."""
import click
import pytest
from click.testing import CliRunner

from featcache.cli import main

COMMANDS = sorted(main.commands)


def test_every_issue_command_is_registered():
    expected = {"teachers", "extract", "info", "verify", "convert", "train", "probe", "sweep", "report", "demo"}
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_documents_the_command_and_every_option(name):
    result = CliRunner().invoke(main, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    command = main.commands[name]
    assert command.help and command.help.strip(), f"`featcache {name}` has no docstring"
    undocumented = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
    assert not undocumented, f"`featcache {name}` options without help: {undocumented}"
