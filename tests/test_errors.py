"""One error path: the CLI turns a FeatcacheError into one line and a non-zero exit; any other exception is a bug
and keeps its traceback (featcache/errors.py, the ``Group`` of featcache/cli.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from featcache import errors
from featcache.cli import main

ERRORS = [getattr(errors, name) for name in errors.__all__]
BUILTIN_BASE = {errors.ConfigError: ValueError, errors.UnknownNameError: KeyError,
                errors.MissingFileError: FileNotFoundError, errors.CompatError: ValueError,
                getattr(errors, "RunExistsError", None): FileExistsError}


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_derives_from_the_one_base(cls):
    assert issubclass(cls, errors.FeatcacheError)
    assert issubclass(cls, BUILTIN_BASE.get(cls, Exception))  # library callers may keep catching the builtin


def test_unknown_name_reads_as_plain_text():
    assert str(errors.UnknownNameError("unknown method 'kdd'; known: kd")) == "unknown method 'kdd'; known: kd"


@pytest.mark.parametrize("error", [errors.CacheError("cache 'x' is incomplete; re-run the same command"),
                                   errors.UnknownNameError("unknown store format 'zar'; known: hdf5, wds, zarr"),
                                   errors.DecodeError("imgs/a.png", "truncated")], ids=lambda e: type(e).__name__)
def test_a_featcache_error_is_one_line_and_a_nonzero_exit(monkeypatch, error):
    def fail(cfg):
        raise error

    monkeypatch.setattr("featcache.extract.run_extract", fail)
    result = CliRunner().invoke(main, ["extract", "--data", "d", "--out", "o"])
    assert result.exit_code == 1
    assert result.output == f"Error: {error}\n" and "Traceback" not in result.output


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), ValueError("a bug, not a user error"),
                                 KeyError("missing")], ids=lambda e: type(e).__name__)
def test_a_bug_keeps_its_traceback(monkeypatch, bug):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr("featcache.extract.run_extract", broken)
    with pytest.raises(type(bug)):
        CliRunner().invoke(main, ["extract", "--data", "d", "--out", "o"], catch_exceptions=False)


def test_a_bug_prints_its_traceback_from_the_command_line(tmp_path):
    """The installed entry point, with a library function patched to divide by zero."""
    code = ("import functools, importlib, featcache.cli as cli\n"
            "module, name = cli.INFO.split(':'); module = importlib.import_module(module)\n"
            "@functools.wraps(getattr(module, name))  # keeps the signature the options read their defaults from\n"
            "def broken(*args, **kwargs): 1 / 0\n"
            "setattr(module, name, broken)\n"
            f"cli.main(['info', {str(tmp_path)!r}])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr


def test_usage_errors_keep_clicks_exit_code():
    result = CliRunner().invoke(main, ["train", "--epochs", "many"])
    assert result.exit_code == 2 and "'many' is not a valid integer" in result.output
