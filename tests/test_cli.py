"""The ``gradindex`` command line: commands, output, help texts, start-up imports and
actionable errors (one line, no traceback)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gradindex import Settings
from gradindex.cli import app, check_listen, demo_settings, demo_url, parse_task_args
from gradindex.indexer.build import BuildConfig
from gradindex.indexer.demo import demo_weights
from gradindex.indexer.errors import ConfigError
from gradindex.indexer.registry import COMPRESSORS, FAISS_KINDS, FISHER_CHOICES, SHAPES
from gradindex.indexer.store import SCOPES, FaissConfig

from .conftest import GRADINDEX, REPO, STORE_TASK, STORE_TASK_ARGS, storage_env

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
    code, out = invoke(settings, "refinalize", "cli", "--faiss", "ivf", "--oversample", "16")
    assert code == 0, out
    faiss = json.loads(invoke(settings, "info", "cli")[1])["manifest"]["faiss"]
    assert (faiss["kind"], faiss["oversample"]) == ("ivf", 16)
    code, out = invoke(settings, "refinalize", "cli", "--fisher", "sampled")
    # the default `auto` Fisher resolved to `expected`: the task defines logits
    assert code == 1 and "staged with the 'expected' Fisher" in out and "Traceback" not in out
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


def test_serve_refuses_an_unmigrated_postgresql_in_one_line(
    pg_databases: Callable[[], str], tmp_path: Path
) -> None:
    """The server never migrates PostgreSQL (replicas would race): it names the command."""
    settings = Settings(data_dir=tmp_path, database_url=pg_databases())
    done = subprocess.run([*GRADINDEX, "serve", "--port", "0"], cwd=REPO, timeout=120,
                          env={**os.environ, **storage_env(settings)}, capture_output=True,
                          text=True)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "gradindex db upgrade" in done.stderr
    from sqlalchemy import create_engine, inspect

    engine = create_engine(settings.url)
    assert "examples" not in inspect(engine).get_table_names()  # nothing was migrated
    engine.dispose()


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


# ----------------------------------------------------------------------------- errors


def test_bad_option_values_are_one_line_usage_errors() -> None:
    result = CliRunner().invoke(app, [*BUILD, "--faiss", "annoy"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: Invalid value for '--faiss': 'annoy' is not one of 'flat', 'hnsw', 'ivf' "
        "(`root build --help` lists the options)"]


def test_missing_weights_at_build_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, **storage_env(Settings(data_dir=tmp_path / "data"))}
    missing = tmp_path / "no-such-weights.safetensors"
    done = subprocess.run(
        [*GRADINDEX, "build", "--task", STORE_TASK, "--name", "w", "--task-arg", "model=mlp",
         "--task-arg", f"weights={missing}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"error: digits weights {str(missing)!r} do not exist"]
    assert done.stdout == ""


def test_an_unusable_data_directory_is_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    result = CliRunner().invoke(app, ["list"],
                                env={"GRADINDEX_DATA_DIR": str(a_file / "data")})
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"error: Not a directory: '{a_file / 'data'}'"]


BROKEN_TASK = '''
class Broken:
    def model(self):
        raise RuntimeError("the model is broken")

    def examples(self):
        return [("a", {})]

    def collate(self, payloads):
        return payloads

    def loss(self, model, batch, sample=False):
        raise AssertionError("never reached")
'''


def test_an_unexpected_error_is_one_line_and_its_traceback_needs_verbose(
    tmp_path: Path,
) -> None:
    task = tmp_path / "broken.py"
    task.write_text(BROKEN_TASK)
    env = storage_env(Settings(data_dir=tmp_path / "data"))
    args = ["build", "--task", f"{task}:Broken", "--name", "broken"]
    quiet = CliRunner().invoke(app, args, env=env)
    assert quiet.exit_code == 1 and quiet.exception is not None  # SystemExit(1)
    assert quiet.stderr.splitlines() == [
        "error: unexpected RuntimeError: the model is broken "
        "(`gradindex --verbose ...` shows the traceback)"]
    verbose = CliRunner().invoke(app, ["--verbose", *args], env=env)
    assert isinstance(verbose.exception, RuntimeError)
    assert str(verbose.exception) == "the model is broken"


# ----------------------------------------------------------------------------- help texts


def _commands(group: typer.Typer) -> list[list[str]]:
    """The path of every command of ``group``, e.g. ``["keys", "create"]``."""
    paths = [[cmd.name or ""] for cmd in group.registered_commands]
    for sub in group.registered_groups:
        assert sub.typer_instance is not None and sub.name is not None
        paths += [[sub.name, *path] for path in _commands(sub.typer_instance)]
    return paths


def _help(*path: str) -> str:
    """The ``--help`` text of a command, wide enough that no entry wraps."""
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def _options(help_text: str) -> dict[str, str]:
    """Each option's entry of a ``--help`` text (its first name → its whole entry)."""
    entries: dict[str, str] = {}
    section = help_text.split("\nOptions:\n", 1)[1]
    name = ""
    for line in section.splitlines():
        if line.startswith("  -"):
            name = next(t for t in line.split() if t.startswith("--")).rstrip(",")
            entries[name] = line
        elif name:
            entries[name] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in entries.items()}


CHOICES = {"--compressor": ("auto", *COMPRESSORS), "--shape": tuple(SHAPES),
           "--fisher": FISHER_CHOICES, "--faiss": FAISS_KINDS}
FLAGS = {"--verbose", "--help", "--build-only", "--all", "--text"}
"""The options that are plain on/off switches (no value, no default to show)."""


def test_every_option_shows_its_default_and_choices() -> None:
    checked = set()
    for path in [[], *_commands(app)]:
        text = _help(*path)
        assert "<bool>" not in text, path
        for name, entry in _options(text).items():
            if name in FLAGS:
                assert entry.split()[1] not in ("<bool>", "<str>"), entry  # shown as a flag
                continue
            assert re.search(r"\[default: [^\]]+\]|\[required\]", entry), (path, entry)
            if name in CHOICES:
                assert f"<{'|'.join(CHOICES[name])}>" in entry, entry
                checked.add(name)
    assert checked == set(CHOICES)


def test_serve_help_shows_where_the_address_comes_from() -> None:
    text = " ".join(_help("serve").split())
    assert ("--host <str> Address to listen on. "
            "[default: (GRADINDEX_HOST, else 127.0.0.1)]") in text
    assert "[default: (GRADINDEX_PORT, else 8000)]" in text


def test_boolean_options_are_flags() -> None:
    build = _options(_help("build"))
    assert build["--fp16"].startswith("--fp16 / --no-fp16 Store FAISS codes as float16.")
    assert build["--fp16"].endswith("[default: no-fp16]")
    demo = _options(_help("demo"))
    assert demo["--build-only"] == "--build-only Train and index, then exit without serving."
    refused = CliRunner().invoke(app, ["demo", "--build-only", "true"])
    assert refused.exit_code == 2
    assert "unexpected extra argument(s) (true)" in refused.stderr


def test_demo_build_only_skips_the_server_settings(tmp_path: Path) -> None:
    """``--build-only`` is a flag: the demo goes straight to building, and never reads the
    server's settings (a bad GRADINDEX_PORT fails the serving demo before it trains)."""
    settings = Settings(data_dir=tmp_path / "data",
                        database_url="postgresql+psycopg://postgres@127.0.0.1:9/none")
    weights = demo_weights(settings)  # present, so the demo goes on to the database at once
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    env = {**storage_env(settings), "GRADINDEX_PORT": "eighty"}
    serving = CliRunner().invoke(app, ["demo"], env=env)
    assert serving.exit_code == 1 and "`port` (GRADINDEX_PORT)" in serving.stderr
    built = CliRunner().invoke(app, ["demo", "--build-only"], env=env)
    assert built.exit_code == 1 and len(built.stderr.splitlines()) == 1
    assert built.stderr.startswith("error: cannot reach the database")


def test_key_scopes_are_named_in_the_help() -> None:
    entry = _options(_help("keys", "create"))["--scope"]
    assert all(scope in entry for scope in SCOPES) and entry.endswith("[default: read]")


def test_build_defaults_are_the_library_defaults() -> None:
    """The CLI spells out defaults of classes it does not import at start-up (torch, SQL)."""
    build = _options(_help("build"))
    defaults = {f.name: f.default for f in fields(BuildConfig)}
    assert build["--chunk-size"].endswith(f"[default: {defaults['chunk_size']}]")
    assert build["--window"].endswith(f"[default: {defaults['window']}]")
    assert build["--faiss"].endswith(f"[default: {FaissConfig().kind}]")
    assert f"[default: {FaissConfig().oversample};" in build["--oversample"]


# ----------------------------------------------------------------------------- demo address


def test_demo_address_comes_from_options_then_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("GRADINDEX_HOST", "GRADINDEX_PORT", "GRADINDEX_AUTH"):
        monkeypatch.delenv(name, raising=False)
    default = demo_settings()
    assert (default.host, default.port, default.auth_required) == ("127.0.0.1", 8000, False)
    monkeypatch.setenv("GRADINDEX_PORT", "8123")
    monkeypatch.setenv("GRADINDEX_HOST", "::1")
    from_env = demo_settings()
    assert demo_url(from_env) == "http://[::1]:8123" and not from_env.auth_required
    assert demo_url(demo_settings(host="127.0.0.1", port=8001)) == "http://127.0.0.1:8001"
    monkeypatch.setenv("GRADINDEX_AUTH", "on")
    assert demo_settings().auth_required
    monkeypatch.delenv("GRADINDEX_AUTH")
    beyond = demo_settings(host="0.0.0.0")  # keys stay required beyond loopback
    assert beyond.auth_required and demo_url(beyond) == "http://127.0.0.1:8123"


def test_the_served_address_is_checked_before_any_banner() -> None:
    free = check_listen(demo_settings(host="127.0.0.1", port=0))
    assert free.port != 0  # the port the banner shows is the one the server gets
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: "):
            check_listen(demo_settings(host="127.0.0.1", port=port))
        result = CliRunner().invoke(app, ["serve"], env={"GRADINDEX_PORT": str(port)})
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("given,expected", [
    ([], "gradindex demo\n"),
    (["PORT=8001"], "gradindex demo --port 8001\n"),
    (["PORT=8001", "HOST=0.0.0.0"], "gradindex demo --host 0.0.0.0 --port 8001\n"),
])
def test_make_demo_passes_host_and_port(given: list[str], expected: str) -> None:
    # MAKEFLAGS/MAKELEVEL of an outer make (CI runs the tests under make) would add
    # "Entering directory" lines; this make is run as a user would run it
    outer = ("HOST", "PORT", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")
    done = subprocess.run(["make", "-n", "-o", ".venv/.installed", "demo", *given], cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k not in outer},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(expected)


# ----------------------------------------------------------------------------- start-up

HEAVY = ("torch", "faiss", "scipy")


@pytest.mark.parametrize("args", [["--help"], ["db", "upgrade"], ["list"], ["info", "none"],
                                  ["keys", "list"]])
def test_light_commands_never_import_torch_faiss_or_scipy(args: list[str], tmp_path: Path
                                                          ) -> None:
    code = ("import sys\n"
            f"sys.argv = ['gradindex', *{args!r}]\n"
            "from gradindex.cli import main\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
            f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    env = {**os.environ, "GRADINDEX_DATA_DIR": str(tmp_path / "data")}
    env.pop("GRADINDEX_DATABASE_URL", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected_code = "1" if args[0] == "info" else "0"  # `info none`: no such index
    assert done.stdout.splitlines()[-1] == f"{expected_code} []", done.stderr
