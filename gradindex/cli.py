"""The ``gradindex`` command line: build, finalize, list, info, refinalize, delete, serve, keys,
db upgrade.

Errors a user can act on (unknown task, bad shard spec, unreachable database, unknown index)
are printed as one line, without a traceback, and exit with status 1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .indexer.admin import delete_index, index_info, list_indexes
from .indexer.build import (
    BuildConfig,
    build,
    finalize,
    parse_shard,
    refinalize,
    shard_from_env,
)
from .indexer.config import CompressionConfig, PreconditionerConfig
from .indexer.errors import GradindexError
from .indexer.settings import Settings
from .indexer.store import (
    SCOPES,
    FaissConfig,
    connect,
    create_key,
    downgrade,
    list_keys,
    revoke_key,
    upgrade,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="gradindex: a persistent gradient index for training-data attribution.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema migrations.")
app.add_typer(db_app, name="db")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of the server.")
app.add_typer(keys_app, name="keys")

_C = CompressionConfig()  # the build options' defaults are the library's, in one place
_P = PreconditionerConfig()

err = Console(stderr=True)
out = Console()
T = TypeVar("T")


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except GradindexError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


def parse_task_args(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a value is JSON when it parses as JSON, else a string."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--task-arg must look like KEY=VALUE, got {item!r}")
        try:
            args[key] = json.loads(value)
        except ValueError:
            args[key] = value
    return args


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int | None], None]]:
    columns = (
        TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    tasks: dict[str, TaskID] = {}
    with Progress(*columns, console=err, transient=False) as bar:

        def update(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, rate="")
            task_id = tasks[phase]
            bar.update(task_id, completed=done, total=total)
            speed = bar.tasks[task_id].speed
            bar.update(task_id, rate=f"{speed:,.0f} ex/s" if speed else "")

        yield update


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False
          ) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True,
    )
    logging.getLogger("indexer").setLevel(logging.DEBUG if verbose else logging.INFO)


@app.command("build")
def build_cmd(
    task: Annotated[str, typer.Option(help="Task spec: package.module:Name or file.py:Name.")],
    name: Annotated[str, typer.Option(help="Index name.")],
    task_arg: Annotated[list[str] | None, typer.Option(
        help="Task constructor argument KEY=VALUE (JSON when it parses); repeatable.")] = None,
    compressor: Annotated[str, typer.Option(help="Compressor.")] = _C.compressor,
    keep: Annotated[float | None, typer.Option(help="Fraction of coordinates kept.")] = None,
    dim: Annotated[int, typer.Option(
        help="Compressed size per mask (when --keep unset).")] = _C.dim or 4096,
    masks: Annotated[int, typer.Option(help="Independent masks per checkpoint.")] = _C.masks,
    seed: Annotated[int, typer.Option(help="Seed of every mask.")] = _C.seed,
    fisher: Annotated[str, typer.Option(help="empirical | sampled | expected.")] = _P.fisher,
    samples: Annotated[int, typer.Option(
        help="Targets per example (sampled Fisher).")] = _P.samples,
    shape: Annotated[str, typer.Option(help="block | full | identity.")] = _P.shape,
    damping: Annotated[float, typer.Option(help="λ as a multiple of tr(F)/k.")] = _P.damping,
    batch_size: Annotated[int, typer.Option(help="Examples per model pass.")] = _C.batch_size,
    chunk_size: Annotated[int, typer.Option(help="Examples per staging chunk.")] = 1024,
    window: Annotated[int, typer.Option(help="Examples per finalize step.")] = 4096,
    faiss: Annotated[str, typer.Option(help="flat | hnsw | ivf.")] = "flat",
    fp16: Annotated[bool, typer.Option(help="Store FAISS codes as float16.")] = False,
    shard: Annotated[str | None, typer.Option(
        help="i/n: stage only shard i of n (default: RANK/WORLD_SIZE under torchrun).")] = None,
) -> None:
    """Featurize a task's training examples and publish them as an index (resumable)."""

    def make() -> BuildConfig:
        i, n = parse_shard(shard) if shard is not None else (shard_from_env() or (0, 1))
        return BuildConfig(
            name=name, task=task, task_args=parse_task_args(task_arg or []),
            compression=CompressionConfig(compressor=compressor, keep=keep, dim=dim,
                                          masks=masks, seed=seed, batch_size=batch_size),
            preconditioner=PreconditionerConfig(shape=shape, fisher=fisher, samples=samples,
                                                damping=damping),
            faiss=FaissConfig(kind=faiss, fp16=fp16), shard=i, shards=n,
            chunk_size=chunk_size, window=window,
        )

    config = _run(make)
    settings = Settings.from_env()
    with _progress() as progress:
        version = _run(lambda: build(config, settings, progress=progress))
    if version is None:
        err.print(f"shard {config.shard}/{config.shards} of {name!r} staged; when every shard "
                  f"is, run `gradindex finalize {name}`")
    else:
        err.print(f"index {name!r} version {version} published")


@app.command("finalize")
def finalize_cmd(name: Annotated[str, typer.Argument(help="Index name.")]) -> None:
    """Merge every staged shard of an index, fit the preconditioner and publish."""
    settings = Settings.from_env()
    with _progress() as progress:
        version = _run(lambda: finalize(settings, name, progress=progress))
    err.print(f"index {name!r} version {version} published")


@app.command("refinalize")
def refinalize_cmd(
    name: Annotated[str, typer.Argument(help="Index name.")],
    damping: Annotated[float | None, typer.Option(help="New damping.")] = None,
    shape: Annotated[str | None, typer.Option(help="New preconditioner shape.")] = None,
    fisher: Annotated[str | None, typer.Option(help="Must equal the staged Fisher.")] = None,
    faiss: Annotated[str | None, typer.Option(help="New FAISS kind.")] = None,
    fp16: Annotated[bool | None, typer.Option(help="FAISS codes as float16.")] = None,
) -> None:
    """Rebuild an index from its staged gradients (no model pass)."""
    settings = Settings.from_env()

    def run() -> int:
        fcfg = None
        if faiss is not None or fp16 is not None:
            current = index_info(settings, name)["manifest"].get("faiss", {})
            fcfg = FaissConfig.from_json({**current, **({"kind": faiss} if faiss else {}),
                                          **({"fp16": fp16} if fp16 is not None else {})})
        return refinalize(settings, name, damping=damping, shape=shape, fisher=fisher,
                          faiss=fcfg, progress=progress)

    with _progress() as progress:
        version = _run(run)
    err.print(f"index {name!r} version {version} published")


@app.command("list")
def list_cmd() -> None:
    """The indexes, their current versions and sizes."""
    rows = _run(lambda: list_indexes(Settings.from_env()))
    table = Table("name", "version", "examples", "dim", "faiss", "preconditioner", "published")
    for row in rows:
        m = row["manifest"]
        pre = m.get("preconditioner", {})
        fa = m.get("faiss", {})
        table.add_row(
            row["name"], str(row["version"] or "-"), str(row["count"]), str(m.get("dim", "-")),
            f"{fa.get('kind', '-')}{' fp16' if fa.get('fp16') else ''}",
            f"{pre.get('shape', '-')}/{pre.get('fisher', '-')} λ={pre.get('damping', '-')}",
            str(row["published_at"] or "-")[:19],
        )
    out.print(table)


@app.command("info")
def info_cmd(name: Annotated[str, typer.Argument(help="Index name.")]) -> None:
    """An index's manifest and counts, as JSON."""
    row = _run(lambda: index_info(Settings.from_env(), name))
    out.print_json(json.dumps(row, default=str))


@app.command("delete")
def delete_cmd(name: Annotated[str, typer.Argument(help="Index name.")]) -> None:
    """Delete an index: its versions, rows and staged gradients."""
    _run(lambda: delete_index(Settings.from_env(), name))
    err.print(f"index {name!r} deleted")


@app.command("serve")
def serve_cmd(
    host: Annotated[str | None, typer.Option(
        help="Address to listen on [default: GRADINDEX_HOST or 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(
        help="Port [default: GRADINDEX_PORT or 8000].")] = None,
) -> None:
    """Serve the indexes over HTTP (settings from GRADINDEX_*; API keys from `keys create`)."""
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    _serve(overrides)


def _serve(overrides: dict[str, Any], banner: Callable[[Any], None] | None = None) -> None:
    """Run the server with ``GRADINDEX_*`` settings and ``overrides``; errors as one line."""
    from gradindex.server import ServerSettings, run

    settings = _run(lambda: ServerSettings(**overrides))
    logging.getLogger("server").setLevel(logging.INFO)
    if banner is not None:
        banner(settings)
    _run(lambda: run(settings))


@app.command("demo")
def demo_cmd(
    build_only: Annotated[bool, typer.Option(
        "--build-only", help="Train and index, then exit without serving.")] = False,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """Train the digits classifier, index it and serve it; a second run reuses what is built.

    On loopback the demo serves without API keys unless GRADINDEX_AUTH=on is set.
    """
    import os

    from .indexer.demo import prepare_demo

    settings = Settings.from_env()
    with _progress() as update:
        built = _run(lambda: prepare_demo(settings, progress=update))
    err.print(f"index 'digits' {'built' if built else 'already built; reused'} in "
              f"{settings.data_dir}", highlight=False)
    if build_only:
        return
    overrides: dict[str, Any] = {"host": host, "port": port,
                                 "data_dir": settings.data_dir,
                                 "database_url": settings.database_url}
    if "GRADINDEX_AUTH" not in os.environ:
        overrides["auth"] = "off"

    def banner(server_settings: Any) -> None:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{port}"
        header = ("" if not server_settings.auth_required
                  else " -H 'Authorization: Bearer <key from gradindex keys create>'")
        payload = json.dumps({"examples": [_first_test_digit()], "k": 5,
                              "direction": "both"})
        out.print(f"\n[bold]gradindex demo[/] is at [link={url}]{url}[/]\n", highlight=False)
        out.print("Ask which training digits most helped and hurt a test digit:\n",
                  highlight=False)
        out.print(f"curl -s {url}/v1/indexes/digits/influence{header} \\\n"
                  f"  -H 'Content-Type: application/json' -d '{payload}'\n",
                  highlight=False, markup=False, soft_wrap=True)

    _serve(overrides, banner)


def _first_test_digit() -> dict[str, Any]:
    from .indexer.tasks import load_digits_split

    _, _, x_test, y_test = load_digits_split()
    return {"x": [round(float(v), 4) for v in x_test[0]], "y": int(y_test[0])}


@keys_app.command("create")
def keys_create(
    scope: Annotated[str, typer.Option(help=f"One of {', '.join(SCOPES)}.")] = "read",
    name: Annotated[str, typer.Option(help="A label to tell keys apart.")] = "",
) -> None:
    """Create an API key and print its secret (shown this once only)."""
    key, secret = _run(lambda: create_key(engine=connect(Settings.from_env()), scope=scope,
                                          name=name))
    err.print(f"key {key.id} ({key.scope}{', ' + key.name if key.name else ''}) created; "
              "store its secret now, it is not shown again:")
    out.print(secret, highlight=False, markup=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(
    all_keys: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
) -> None:
    """The API keys (never their secrets)."""
    keys = _run(lambda: list_keys(engine=connect(Settings.from_env()),
                                  include_revoked=all_keys))
    table = Table("id", "name", "scope", "prefix", "created", "revoked")
    for k in keys:
        table.add_row(str(k.id), k.name or "-", k.scope, k.prefix + "…",
                      str(k.created_at)[:19], str(k.revoked_at or "-")[:19])
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="The key's id.")]) -> None:
    """Revoke an API key for good."""
    key = _run(lambda: revoke_key(engine=connect(Settings.from_env()), key_id=key_id))
    err.print(f"key {key.id} ({key.scope}) revoked")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head"
               ) -> None:
    """Migrate the database schema up (default: to the latest)."""
    _run(lambda: upgrade(Settings.from_env(), revision))
    err.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "-1"
                 ) -> None:
    """Migrate the database schema down (default: one step)."""
    _run(lambda: downgrade(Settings.from_env(), revision))
    err.print(f"database at {revision}")


def main() -> None:
    """Entry point of the ``gradindex`` script."""
    app(prog_name="gradindex")


if __name__ == "__main__":  # `python -m gradindex.cli`, as torchrun starts it
    main()
