"""The ``gradindex`` command line, in process: commands, output and actionable errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gradindex import Settings
from gradindex.cli import app, parse_task_args

from .conftest import STORE_TASK, STORE_TASK_ARGS

BUILD = ["build", "--task", STORE_TASK, "--name", "cli", "--batch-size", "32",
         *[a for k, v in STORE_TASK_ARGS.items() for a in ("--task-arg", f"{k}={v}")]]


def invoke(settings: Settings, *args: str) -> tuple[int, str]:
    env = {"GRADINDEX_DATA_DIR": str(settings.data_dir),
           "GRADINDEX_DATABASE_URL": settings.database_url or ""}
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_build_list_info_refinalize_delete(settings: Settings) -> None:
    code, out = invoke(settings, *BUILD)
    assert code == 0, out
    assert "version" in out and "published" in out
    code, out = invoke(settings, "list")
    assert code == 0 and "cli" in out and "300" in out
    code, out = invoke(settings, "info", "cli")
    info = json.loads(out)
    assert info["count"] == 300 and info["manifest"]["task"]["args"] == STORE_TASK_ARGS
    code, out = invoke(settings, "refinalize", "cli", "--damping", "0.3")
    assert code == 0, out
    assert json.loads(invoke(settings, "info", "cli")[1])["manifest"]["preconditioner"][
        "damping"] == 0.3
    code, out = invoke(settings, "refinalize", "cli", "--fisher", "expected")
    assert code == 1 and "staged with the 'empirical' Fisher" in out and "Traceback" not in out
    code, out = invoke(settings, "delete", "cli")
    assert code == 0
    code, out = invoke(settings, "info", "cli")
    assert code == 1 and "no index named 'cli'" in out


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize(
    "args,message",
    [
        (["build", "--task", "no.such.module:Task", "--name", "x"], "cannot import module"),
        ([*BUILD, "--shard", "2/2"], "`shard` must be i/n with 0 <= i < n"),
        ([*BUILD, "--shard", "half"], "`shard` must look like i/n"),
        ([*BUILD, "--faiss", "annoy"], "`faiss` must be one of"),
        ([*BUILD, "--keep", "1.5"], "`keep` must be in (0, 1]"),
        (["build", "--task", STORE_TASK, "--name", "../up"], "`name` must be"),
        (["info", "missing"], "no index named 'missing'"),
        (["finalize", "missing"], "has nothing staged"),
    ],
)
def test_errors_are_one_line_without_traceback(
    settings: Settings, args: list[str], message: str
) -> None:
    code, out = invoke(settings, *args)
    assert code == 1
    assert message in " ".join(out.split()) and "Traceback" not in out


def test_unreachable_database(tmp_path: object) -> None:
    settings = Settings(data_dir=tmp_path,  # type: ignore[arg-type]
                        database_url="postgresql+psycopg://postgres@127.0.0.1:9/none")
    code, out = invoke(settings, "list")
    assert code == 1 and "cannot reach the database" in out and "Traceback" not in out


@pytest.mark.parametrize("backend", ["postgresql"])
def test_db_upgrade_and_downgrade(settings: Settings) -> None:
    assert invoke(settings, "db", "downgrade")[0] == 0
    code, out = invoke(settings, "list")
    assert code == 1 and "gradindex db upgrade" in out
    assert invoke(settings, "db", "upgrade")[0] == 0
    assert invoke(settings, "list")[0] == 0


def test_task_args_are_json_when_they_parse() -> None:
    assert parse_task_args(["n=3", "name=logreg", "xs=[1, 2]", "flag=true", "s=\"7\""]) == {
        "n": 3, "name": "logreg", "xs": [1, 2], "flag": True, "s": "7"}
