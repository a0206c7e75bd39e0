"""The `marquee` parser: every command reaches its function, and the light ones stay light."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from entrypoints.cli import build_parser, handler_of

COMMANDS = [
    ["dev"],
    ["api"],
    ["worker"],
    ["events", "consume"],
    ["migrate"],
    ["backup", "dir"],
    ["restore", "dir"],
    ["token", "create", "--role", "analyst"],
    ["codec-server"],
    ["codec-key"],
    ["secrets-key"],
    ["user", "create", "--email", "a@example.com", "--role", "analyst"],
    ["user", "deactivate", "a@example.com", "--reason", "left"],
    ["user", "activate", "a@example.com"],
    ["user", "set-role", "a@example.com", "admin", "--reason", "why"],
    ["user", "reset-password", "a@example.com"],
    ["user", "list"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_command_resolves_to_a_function(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    handler = handler_of(args)
    assert callable(handler)
    assert handler.__module__.startswith("entrypoints.")


def test_the_parser_names_every_command_listed_here() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {argv[0] for argv in COMMANDS}


def test_importing_the_cli_leaves_the_api_worker_and_chdb_unloaded() -> None:
    # A fresh interpreter: this one has imported everything already.
    code = "import sys, entrypoints.cli; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert "entrypoints.cli" in loaded
    assert not loaded & {"api.app", "admin", "worker", "chdb", "uvicorn", "entrypoints.servers", "entrypoints.backup"}
