"""scripts/with-env, scripts/ensure-env and scripts/check-exposure, run by sh as make runs them.

with-env must read .env exactly as Docker Compose does, or `make demo` and the container
would use different keys. There is no Docker here, so the expected values are Compose's
documented behaviour, case by case, from https://docs.docker.com/compose/env-file/
("Syntax for environment files in Docker Compose") and
https://docs.docker.com/reference/compose-file/interpolation/ (and, where the pages are
silent, compose-go's dotenv parser, which is what Compose runs).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import ROOT, free_port

pytestmark = pytest.mark.slow

SCRIPTS = ROOT / "scripts"
# The environment the scripts run in: nothing of ours, so the cases decide.
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
PRINT_ENV = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]


def run(
    cwd: Path, argv: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        env={**BASE_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def read_env(tmp_path: Path, dotenv: str, env: dict[str, str] | None = None) -> dict[str, str]:
    (tmp_path / ".env").write_text(dotenv)
    result = run(tmp_path, ["sh", str(SCRIPTS / "with-env"), *PRINT_ENV], env)
    assert result.returncode == 0, result.stderr
    seen: dict[str, str] = json.loads(result.stdout)
    return seen


# with-env: each row is a line of .env and the value Compose gives the variable.
COMPOSE_CASES = [
    # The env-file page, "Syntax", in its order.
    ("VAR=VAL", "VAL"),
    ('VAR="VAL"', "VAL"),
    ("VAR='VAL'", "VAL"),
    ("VAR=VAL # comment", "VAL"),
    ("VAR=VAL# not a comment", "VAL# not a comment"),
    ('VAR="VAL # not a comment"', "VAL # not a comment"),
    ('VAR="VAL" # comment', "VAL"),
    ("VAR='$OTHER'", "$OTHER"),
    ("VAR='${OTHER}'", "${OTHER}"),
    ("VAR='Let\\'s go!'", "Let's go!"),
    ('VAR="{\\"hello\\": \\"json\\"}"', '{"hello": "json"}'),
    ('VAR="some\\tvalue"', "some\tvalue"),
    ("VAR='some\\tvalue'", "some\\tvalue"),
    ("VAR=some\\tvalue", "some\\tvalue"),
    # The case: Compose reads abc, and so must make demo.
    ('VAR="abc" # c', "abc"),
    ("VAR='abc' # c", "abc"),
    # Whitespace, export, the other separator, empties.
    ("  VAR = spaced value   ", "spaced value"),
    ("export VAR=exported", "exported"),
    ("VAR: yaml style", "yaml style"),
    ("VAR=", ""),
    ('VAR=""', ""),
    ('VAR="a\\nb\\\\c\\"d\\$e"', 'a\nb\\c"d$e'),
    ('VAR="multi\nline"', "multi\nline"),
    ("VAR='multi\nline'", "multi\nline"),
    ("VAR=crlf\r", "crlf"),
    # Interpolation (the interpolation page), in unquoted and double-quoted values.
    ("VAR=${OTHER}", "other"),
    ("VAR=$OTHER/x", "other/x"),
    ('VAR="${OTHER}-$OTHER"', "other-other"),
    ("VAR=${UNSET:-default}", "default"),
    ("VAR=${EMPTY:-default}", "default"),
    ("VAR=${EMPTY-default}", ""),
    ("VAR=${UNSET-default}", "default"),
    ("VAR=${OTHER:+alt}", "alt"),
    ("VAR=${EMPTY:+alt}", ""),
    ("VAR=${EMPTY+alt}", "alt"),
    ("VAR=${UNSET:-${OTHER:-x}}", "other"),
    ("VAR=${UNSET}", ""),
    ("VAR=$$OTHER", "$OTHER"),
    ("VAR=a$ b $1", "a$ b $1"),
    ("VAR=${FROM_SHELL}", "shell"),
]


@pytest.mark.parametrize(("line", "value"), COMPOSE_CASES)
def test_with_env_reads_a_line_as_compose_does(tmp_path: Path, line: str, value: str) -> None:
    dotenv = f"OTHER=other\nEMPTY=\n# a comment\n\n{line}\n"
    seen = read_env(tmp_path, dotenv, {"FROM_SHELL": "shell"})
    assert seen["VAR"] == value


def test_with_env_keeps_the_environment_and_takes_the_last_line(tmp_path: Path) -> None:
    dotenv = "WEBHOOK_SECRET=from-file\nDUP=first\nDUP=second\nONLY_NAME\n1DIGIT=x\n"
    seen = read_env(tmp_path, dotenv, {"WEBHOOK_SECRET": "exported", "ONLY_NAME": "env"})
    assert seen["WEBHOOK_SECRET"] == "exported"
    assert seen["DUP"] == "second"
    assert seen["ONLY_NAME"] == "env"
    assert "1DIGIT" not in seen


def test_with_env_without_a_file_runs_the_command(tmp_path: Path) -> None:
    result = run(tmp_path, ["sh", str(SCRIPTS / "with-env"), *PRINT_ENV], {"A": "1"})
    assert result.returncode == 0
    assert json.loads(result.stdout)["A"] == "1"


@pytest.mark.parametrize(
    ("dotenv", "said"),
    [
        ("MY VAR=x\n", "line 1: a variable name cannot contain a space"),
        ('OK=1\nVAR="never closed\n', "line 2: unterminated quoted value"),
        ("VAR=${UNSET:?set it first}\n", "required variable UNSET is missing a value"),
        ("VAR=${1}\n", "invalid interpolation"),
    ],
)
def test_with_env_stops_where_compose_would(tmp_path: Path, dotenv: str, said: str) -> None:
    (tmp_path / ".env").write_text(dotenv)
    result = run(tmp_path, ["sh", str(SCRIPTS / "with-env"), "echo", "ran"])
    assert result.returncode != 0
    assert said in result.stderr
    assert "ran" not in result.stdout


def test_with_env_values_reach_the_command_verbatim(tmp_path: Path) -> None:
    hostile = "it's $(touch pwned) `touch pwned` ; \\ \" done"
    quoted = hostile.replace("'", "\\'")
    seen = read_env(tmp_path, f"VAR='{quoted}'\n")
    assert seen["VAR"] == hostile
    assert not (tmp_path / "pwned").exists()


# ensure-env


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ensure_env(
    tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run(tmp_path, ["sh", str(SCRIPTS / "ensure-env")], env)


def secret_in(tmp_path: Path) -> str:
    return read_env(tmp_path, (tmp_path / ".env").read_text())["WEBHOOK_SECRET"]


def test_ensure_env_writes_a_new_env_with_mode_0600(tmp_path: Path) -> None:
    result = ensure_env(tmp_path)
    assert result.returncode == 0, result.stderr
    assert mode(tmp_path / ".env") == 0o600
    assert len(secret_in(tmp_path)) == 64
    assert "wrote a fresh random one" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == [".env"]


def test_ensure_env_never_writes_through_a_planted_temporary_file(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("LOG_LEVEL=DEBUG\nWEBHOOK_SECRET=\n")
    dotenv.chmod(0o600)
    planted = tmp_path / ".env.tmp"
    planted.write_text("someone else's\n")
    planted.chmod(0o666)
    assert ensure_env(tmp_path).returncode == 0
    assert mode(dotenv) == 0o600
    assert planted.read_text() == "someone else's\n"
    text = dotenv.read_text()
    assert text.startswith("LOG_LEVEL=DEBUG\n")
    assert text.count("WEBHOOK_SECRET") == 1
    assert len(secret_in(tmp_path)) == 64


@pytest.mark.parametrize(
    "unset_line",
    ["WEBHOOK_SECRET=", 'WEBHOOK_SECRET=""', "export WEBHOOK_SECRET=''", " WEBHOOK_SECRET = "],
)
def test_ensure_env_replaces_an_empty_secret_in_any_form(tmp_path: Path, unset_line: str) -> None:
    (tmp_path / ".env").write_text(f"{unset_line}\nAPI_PORT=8080")  # no final newline
    assert ensure_env(tmp_path).returncode == 0
    lines = (tmp_path / ".env").read_text().splitlines()
    assert lines[0] == "API_PORT=8080"
    assert len(lines) == 2
    assert len(secret_in(tmp_path)) == 64


@pytest.mark.parametrize("line", ['WEBHOOK_SECRET="abc" # c', "export WEBHOOK_SECRET=abc"])
def test_ensure_env_keeps_a_secret_compose_would_read(tmp_path: Path, line: str) -> None:
    (tmp_path / ".env").write_text(line + "\n")
    (tmp_path / ".env").chmod(0o600)
    result = ensure_env(tmp_path)
    assert result.returncode == 0
    assert (tmp_path / ".env").read_text() == line + "\n"
    assert result.stderr == ""


def test_ensure_env_warns_about_an_env_others_can_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WEBHOOK_SECRET=abc\n")
    for loose in [0o644, 0o640, 0o604]:
        (tmp_path / ".env").chmod(loose)
        result = ensure_env(tmp_path)
        assert result.returncode == 0
        assert "others can read it: chmod 600 .env" in result.stderr
    (tmp_path / ".env").chmod(0o600)
    assert ensure_env(tmp_path).stderr == ""


def test_ensure_env_leaves_an_exported_secret_alone(tmp_path: Path) -> None:
    assert ensure_env(tmp_path, {"WEBHOOK_SECRET": "exported"}).returncode == 0
    assert not (tmp_path / ".env").exists()


# check-exposure, and `make up` running it before Compose


def check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    argv = ["sh", str(SCRIPTS / "with-env"), "sh", str(SCRIPTS / "check-exposure")]
    return run(tmp_path, argv, env)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2", ""])
def test_loopback_needs_nothing(tmp_path: Path, host: str) -> None:
    result = check(tmp_path, API_HOST=host)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_a_public_port_without_read_tokens_is_refused(tmp_path: Path, host: str) -> None:
    result = check(tmp_path, API_HOST=host)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "READ_TOKENS" in line


def test_a_public_port_in_env_file_counts_too(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("API_HOST=0.0.0.0\n")
    assert check(tmp_path).returncode == 2
    (tmp_path / ".env").write_text("API_HOST=0.0.0.0\nREAD_TOKENS=abcdef0123456789abcdef\n")
    assert check(tmp_path, ALLOWED_HOSTS="receiver.example").returncode == 0


@pytest.mark.parametrize("allow", ["true", "TRUE", "1", "yes"])
def test_open_reads_can_be_published_deliberately(tmp_path: Path, allow: str) -> None:
    result = check(tmp_path, API_HOST="0.0.0.0", ALLOW_OPEN_READS=allow)
    assert result.returncode == 0
    assert "ALLOWED_HOSTS" in result.stderr  # a reminder, not a refusal


def test_make_up_refuses_before_compose_starts(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    for name in [
        "Makefile",
        "requirements.txt",
        "requirements-dev.txt",
        "deploy/requirements-checkov.txt",
    ]:
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(SCRIPTS, tmp_path / "scripts")
    # A docker that only notes it was called.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/called"\n')
    (bin_dir / "docker").chmod(0o755)
    # A port nothing listens on, for wait-ready's probe.
    env = {"PATH": f"{bin_dir}{os.pathsep}{BASE_ENV['PATH']}", "API_PORT": str(free_port())}
    refused = run(tmp_path, ["make", "up"], {**env, "API_HOST": "0.0.0.0"})
    assert refused.returncode != 0
    assert "READ_TOKENS" in refused.stderr
    assert "No such file" not in refused.stderr
    assert not (bin_dir / "called").exists()
    # With a token, make goes on to Compose (the stub docker; wait-ready is not reached
    # in a meaningful way, so only the call is checked).
    token = {"READ_TOKENS": "abcdef0123456789abcdef", "UP_TIMEOUT": "1"}
    run(tmp_path, ["make", "up"], {**env, "API_HOST": "0.0.0.0", **token})
    assert "compose up -d --build" in (bin_dir / "called").read_text()
