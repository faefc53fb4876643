"""The ``gradindex`` command line: build, finalize, list, info, verify, refinalize, repair,
delete, serve, demo, keys, db upgrade.

Start-up stays light: the module imports typer, rich, the settings and the strategy names
(:mod:`.indexer.registry`) only. Torch, FAISS and the server are imported inside the commands
that run a model (build, finalize, refinalize, serve, demo), SQLAlchemy inside those that open
the database, so ``--help``, ``list``, ``info``, ``keys`` and ``db`` never load torch.

Errors a user can act on (an unknown task, a missing weights file, an unreadable file, a bad
option, a database that is down, an unknown index) are printed as one line, without a
traceback: exit status 1, or 2 for a command line that does not parse. Any other exception is
one line naming it, and its traceback with ``gradindex --verbose``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeAlias

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
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

# typer ships its own copy of click: its exceptions are the ones the commands raise
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

from .indexer.config import CompressionConfig, PreconditionerConfig
from .indexer.errors import ConfigError, GradindexError
from .indexer.registry import COMPRESSORS, FAISS_KINDS, FISHER_CHOICES, SHAPES

if TYPE_CHECKING:
    from gradindex.server import ServerSettings

    from .indexer.settings import Settings

    Compressor: TypeAlias = str
    Shape: TypeAlias = str
    Fisher: TypeAlias = str
    FaissKind: TypeAlias = str
    StoreKind: TypeAlias = str
else:  # typer offers a Literal's values as the option's choices
    Compressor = Literal[("auto", *COMPRESSORS)]
    Shape = Literal[tuple(SHAPES)]
    Fisher = Literal[FISHER_CHOICES]
    FaissKind = Literal[FAISS_KINDS]
    StoreKind = Literal["faiss", "milvus"]  # gradindex.indexer.store.milvus.STORES

__all__ = ["app", "check_listen", "demo_settings", "demo_url", "main", "parse_task_args"]

DEFAULT_FAISS = "flat"
"""``FaissConfig().kind`` (the store loads SQLAlchemy, so it is not imported for the default)."""
DEFAULT_CHUNK_SIZE = 1024
"""``BuildConfig.chunk_size`` (the build module loads torch)."""
DEFAULT_WINDOW = 4096
"""``BuildConfig.window``."""
DEMO_INDEX = "digits"
"""The index ``gradindex demo`` builds (``prepare_demo``'s default name)."""

VERBOSE_HINT = "`gradindex --verbose ...` shows the traceback"

err = Console(stderr=True)
out = Console()


def _fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` as one error line and exit with ``code``."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _os_message(exc: OSError) -> str:
    """``Permission denied: '/data/x'`` rather than ``[Errno 13] Permission denied: ...``."""
    what = exc.strerror or str(exc)
    return f"{what}: {str(exc.filename)!r}" if exc.filename is not None else what


class _Commands(TyperGroup):
    """The command tree; it turns every error into one line (see the module docstring)."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except NoArgsIsHelpError:
            raise
        except ClickException as exc:
            _usage_error(exc)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, NoArgsIsHelpError):
            raise
        except ClickException as exc:
            _usage_error(exc)
        except GradindexError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(_os_message(exc))
        except Exception as exc:
            if ctx.find_root().params.get("verbose"):
                raise
            orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError: the driver's error
            if orig is not None:
                text = " ".join(str(orig).split())
                if "disk is full" in text.lower() or "no space left" in text.lower():
                    _fail(f"the database's disk is full ({text}); free space and run the "
                          "command again")
                _fail(f"the database failed: {type(orig).__name__}: {text} ({VERBOSE_HINT})")
            _fail(f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())} "
                  f"({VERBOSE_HINT})")


def _usage_error(exc: ClickException) -> NoReturn:
    message = exc.format_message().replace("Value error, ", "").rstrip(".")
    command = getattr(getattr(exc, "ctx", None), "command_path", None)
    hint = f" (`{command} --help` lists the options)" if command else ""
    _fail(message + hint, code=exc.exit_code)


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  rich_markup_mode=None, pretty_exceptions_show_locals=False,
                  context_settings={"max_content_width": 120},  # a wide terminal: no wraps
                  help="gradindex: a persistent gradient index for training-data attribution.")
db_app = typer.Typer(cls=_Commands, no_args_is_help=True, rich_markup_mode=None,
                     help="Database schema migrations.")
app.add_typer(db_app, name="db")
keys_app = typer.Typer(cls=_Commands, no_args_is_help=True, rich_markup_mode=None,
                       help="API keys of the server.")
app.add_typer(keys_app, name="keys")

_C = CompressionConfig()  # the build options' defaults are the library's, in one place
_P = PreconditionerConfig()


def _settings() -> Settings:
    """The storage settings from ``GRADINDEX_*`` (pydantic loads with them, not at start-up)."""
    from .indexer.settings import Settings

    return Settings.from_env()


def parse_task_args(items: Sequence[str]) -> dict[str, Any]:
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
    bar = Progress(*columns, console=err, transient=False)

    def update(phase: str, done: int, total: int | None) -> None:
        if not tasks:  # shown from the first update on: an early error stays one line
            bar.start()
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total, rate="")
        task_id = tasks[phase]
        bar.update(task_id, completed=done, total=total)
        speed = bar.tasks[task_id].speed
        bar.update(task_id, rate=f"{speed:,.0f} ex/s" if speed else "")

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


@app.callback()
def _main(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Debug logs, and the traceback of an unexpected error.")] = False
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
        metavar="KEY=VALUE", show_default="none",
        help="Task constructor argument (JSON when it parses); repeatable.")] = None,
    compressor: Annotated[Compressor, typer.Option(
        help="Compressor; auto: factorized-dropout k=2048 ×2 for one checkpoint, "
             "dropout-sjlt k=4096 ×1 for an ensemble of several.")] = _C.compressor,
    keep: Annotated[float | None, typer.Option(
        show_default="unset: --dim decides", help="Fraction of coordinates kept.")] = None,
    dim: Annotated[int | None, typer.Option(
        show_default="auto's choice, else 2048",
        help="Compressed size per mask (when --keep is unset).")] = _C.dim,
    masks: Annotated[int | None, typer.Option(
        show_default="auto's choice, else 2",
        help="Independent masks per checkpoint.")] = _C.masks,
    seed: Annotated[int, typer.Option(help="Seed of every mask.")] = _C.seed,
    fisher: Annotated[Fisher, typer.Option(
        help="Which gradients estimate the Fisher; auto: expected if the task has logits, "
             "else sampled if its loss samples, else empirical.")] = _P.fisher,
    samples: Annotated[int | None, typer.Option(
        show_default="as the budget allows",
        help="Targets per example (sampled Fisher).")] = _P.samples,
    fisher_budget: Annotated[int | None, typer.Option(
        help="Fisher rows (examples × classes or samples) of the sampled/expected Fisher, "
             "from a seeded subset of the examples; 0: every example.")
                             ] = _P.fisher_budget,
    shape: Annotated[Shape, typer.Option(help="Preconditioner shape.")] = _P.shape,
    damping: Annotated[float, typer.Option(help="λ as a multiple of tr(F)/k.")] = _P.damping,
    batch_size: Annotated[int, typer.Option(
        help="Examples per model pass; lower it for long sequences on a small GPU.")
    ] = _C.batch_size,
    modules: Annotated[list[str] | None, typer.Option(
        "--modules", metavar="PATTERN", show_default="the task's choice",
        help="Attribute the modules whose names match this fnmatch pattern ('*' matches dots "
             "too), e.g. 'transformer.h.*.mlp.*'; repeatable. Default: the task's choice; for "
             "a language model every linear map of its blocks, without the embeddings (lookup "
             "tables, not linear maps over tokens) or the LM head (vocabulary-sized gradients "
             "that mostly say which tokens occur), and only lora_A/lora_B for a PEFT adapter."
    )] = None,
    chunk_size: Annotated[int, typer.Option(
        help="Examples per staging chunk.")] = DEFAULT_CHUNK_SIZE,
    window: Annotated[int, typer.Option(help="Examples per finalize step.")] = DEFAULT_WINDOW,
    faiss: Annotated[FaissKind, typer.Option(help="FAISS index.")] = DEFAULT_FAISS,
    fp16: Annotated[bool, typer.Option(
        "--fp16/--no-fp16", help="Store FAISS codes as float16.")] = False,
    pq: Annotated[int | None, typer.Option(
        show_default="unset: full codes",
        help="`ivf` only: product-quantized codes of PQ bytes per vector (PQ divides the "
             "dimension); results are re-ranked exactly from the stored vectors.")] = None,
    oversample: Annotated[int, typer.Option(
        min=1, help="Approximate kinds: candidates fetched per result, then re-ranked "
                    "exactly. PQ codes rank coarsely: at 10^7 vectors `--pq 16` needs 64 for "
                    "recall@10 0.985 (0.48 at 4; bench/RESULTS.md).")] = 4,
    store: Annotated[StoreKind | None, typer.Option(
        show_default="the index's current store, else faiss",
        help="Where the vectors are searched: faiss (files beside them) or milvus (a "
             "collection in GRADINDEX_VECTOR_STORE, a Milvus server URL or a milvus-lite "
             "file; default: milvus.db in the data directory), indexed as --faiss asks.")
    ] = None,
    shard: Annotated[str | None, typer.Option(
        metavar="i/n", show_default="RANK/WORLD_SIZE under torchrun, else 0/1",
        help="Stage only shard i of n.")] = None,
) -> None:
    """Featurize a task's training examples and publish them as an index (resumable)."""
    from .indexer.build import BuildConfig, build, parse_shard, shard_from_env
    from .indexer.store import FaissConfig

    i, n = parse_shard(shard) if shard is not None else (shard_from_env() or (0, 1))
    config = BuildConfig(
        name=name, task=task, task_args=parse_task_args(task_arg or []),
        compression=CompressionConfig(compressor=compressor, keep=keep, dim=dim,
                                      masks=masks, seed=seed, batch_size=batch_size,
                                      modules=tuple(modules or ())),
        preconditioner=PreconditionerConfig(shape=shape, fisher=fisher, samples=samples,
                                            fisher_budget=fisher_budget or None,
                                            damping=damping),
        faiss=FaissConfig(kind=faiss, fp16=fp16, pq=pq, oversample=oversample), store=store,
        shard=i, shards=n,
        chunk_size=chunk_size, window=window,
    )
    settings = _settings()
    with _progress() as progress:
        version = build(config, settings, progress=progress)
    if version is None:
        err.print(f"shard {config.shard}/{config.shards} of {name!r} staged; when every shard "
                  f"is, run `gradindex finalize {name}`")
    else:
        err.print(f"index {name!r} version {version} published")


@app.command("add")
def add_cmd(
    name: Annotated[str, typer.Argument(help="Index name.")],
    task: Annotated[str, typer.Option(
        help="Task spec whose examples() yield the new examples (package.module:Name or "
             "file.py:Name); ids the index holds are skipped, its model must be the index's.")],
    task_arg: Annotated[list[str] | None, typer.Option(
        metavar="KEY=VALUE", show_default="none",
        help="Task constructor argument (JSON when it parses); repeatable.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        show_default="the index's", help="Examples per model pass.")] = None,
) -> None:
    """Add new training examples to an index: featurize only them, with the index's masks and
    preconditioner, and publish a version holding old and new (`refinalize` refits later)."""
    from .indexer.append import add
    from .indexer.task import TaskSpec

    settings = _settings()
    with _progress() as progress:
        done = add(settings, name, TaskSpec(task, parse_task_args(task_arg or [])),
                   batch_size=batch_size, progress=progress)
    if done.version is None:
        err.print(f"index {name!r}: nothing to add ({done.skipped} examples already indexed)")
    else:
        err.print(f"index {name!r} version {done.version} published: {done.added} examples "
                  f"added ({done.skipped} already indexed)")


@app.command("finalize")
def finalize_cmd(
    name: Annotated[str, typer.Argument(help="Index name.")],
    store: Annotated[StoreKind | None, typer.Option(
        show_default="the index's current store, else faiss",
        help="Where the vectors are searched: faiss or milvus (see `build --help`).")
    ] = None,
) -> None:
    """Merge every staged shard of an index, fit the preconditioner and publish."""
    from .indexer.build import finalize

    settings = _settings()
    with _progress() as progress:
        version = finalize(settings, name, progress=progress, store=store)
    err.print(f"index {name!r} version {version} published")


@app.command("refinalize")
def refinalize_cmd(
    name: Annotated[str, typer.Argument(help="Index name.")],
    damping: Annotated[float | None, typer.Option(
        show_default="the index's", help="New damping.")] = None,
    shape: Annotated[Shape | None, typer.Option(
        show_default="the index's", help="New preconditioner shape.")] = None,
    fisher: Annotated[Fisher | None, typer.Option(
        show_default="the index's", help="Must equal the staged Fisher.")] = None,
    faiss: Annotated[FaissKind | None, typer.Option(
        show_default="the index's", help="New FAISS index.")] = None,
    fp16: Annotated[bool | None, typer.Option(
        "--fp16/--no-fp16", show_default="the index's", help="FAISS codes as float16.")
                    ] = None,
    oversample: Annotated[int | None, typer.Option(
        min=1, show_default="the index's",
        help="Candidates fetched per result by an approximate index, re-ranked exactly.")
    ] = None,
) -> None:
    """Rebuild an index from its staged gradients (no model pass)."""
    from .indexer.admin import index_info
    from .indexer.build import refinalize
    from .indexer.store import FaissConfig

    settings = _settings()
    fcfg = None
    if faiss is not None or fp16 is not None or oversample is not None:
        current = index_info(settings, name)["manifest"].get("faiss", {})
        fcfg = FaissConfig.from_json({**current, **({"kind": faiss} if faiss else {}),
                                      **({"fp16": fp16} if fp16 is not None else {}),
                                      **({"oversample": oversample} if oversample else {})})
    with _progress() as progress:
        version = refinalize(settings, name, damping=damping, shape=shape, fisher=fisher,
                             faiss=fcfg, progress=progress)
    err.print(f"index {name!r} version {version} published")


@app.command("list")
def list_cmd() -> None:
    """The indexes, their current versions and sizes."""
    from .indexer.admin import list_indexes

    rows = list_indexes(_settings())
    table = Table("name", "version", "examples", "dim", "faiss", "preconditioner", "published")
    for row in rows:
        m = row["manifest"]
        pre = m.get("preconditioner", {})
        fa = m.get("faiss", {})
        table.add_row(
            row["name"], str(row["version"] or "-"), str(row["count"]), str(m.get("dim", "-")),
            f"{fa.get('kind', '-')}{' fp16' if fa.get('fp16') else ''}"
            f"{' PQ' + str(fa['pq']) if fa.get('pq') else ''}",
            f"{pre.get('shape', '-')}/{pre.get('fisher', '-')} λ={pre.get('damping', '-')}",
            str(row["published_at"] or "-")[:19],
        )
    out.print(table)


@app.command("info")
def info_cmd(name: Annotated[str, typer.Argument(help="Index name.")]) -> None:
    """An index's manifest and counts, as JSON."""
    from .indexer.admin import index_info

    row = index_info(_settings(), name)
    out.print_json(json.dumps(row, default=str))


@app.command("verify")
def verify_cmd(name: Annotated[str, typer.Argument(help="Index name.")]) -> None:
    """Check every file of an index's current version against the SHA-256 its manifest
    recorded: exit 0 when all match, else one line saying which differ and exit 1."""
    from sqlalchemy.orm import Session

    from .indexer.settings import check_name
    from .indexer.store import checksum_problems, connect, current_version, load_manifest

    check_name(name)
    settings = _settings()
    with Session(connect(settings)) as session:
        version = current_version(session=session, name=name)
        number, path = int(version.number or version.id), str(version.path)
    folder = settings.data_dir / path
    try:
        manifest = load_manifest(folder)
    except GradindexError as exc:
        _fail(f"index {name!r} version {number}: {exc}")
    if manifest.get("checksums") is None:
        err.print(f"index {name!r} version {number} was written before checksums (manifest "
                  f"format {manifest.get('format_version')}); nothing to verify",
                  highlight=False, soft_wrap=True)
        return
    problems = checksum_problems(folder, manifest)
    if problems:
        _fail(f"index {name!r} version {number} is damaged: {'; '.join(problems)}; rebuild "
              f"it with `gradindex refinalize {name}`")
    err.print(f"index {name!r} version {number}: {len(manifest['checksums'])} files match "
              "their checksums", highlight=False, soft_wrap=True)
    _verify_collection(settings, name, number, manifest)


def _verify_collection(settings: Settings, name: str, number: int,
                       manifest: dict[str, Any]) -> None:
    """``--store milvus``: the version's collection is there, loaded, with every row; the
    collections of publishes that died are dropped (unless a finalize runs now)."""
    from .indexer.store import connect, file_lock
    from .indexer.store.milvus import clean_collections, open_version

    entry = manifest.get("store") or {}
    try:
        with file_lock(settings.index_dir(name) / "finalize.lock", f"finalize of {name!r}"):
            dropped = clean_collections(vector_store=settings.vector_store,
                                        data_dir=settings.data_dir, engine=connect(settings),
                                        name=name)
    except GradindexError:
        dropped = []  # a finalize runs: its collection is not an orphan
    if dropped:
        err.print(f"index {name!r}: dropped {len(dropped)} Milvus collection(s) of publishes "
                  f"that did not finish: {', '.join(dropped)}", highlight=False, soft_wrap=True)
    if entry.get("kind") != "milvus":
        return
    version = open_version(vector_store=settings.vector_store, data_dir=settings.data_dir,
                           entry=entry, label=f"index {name!r} version {number}",
                           remedy=f"rebuild it with `gradindex refinalize {name}`")
    err.print(f"index {name!r} version {number}: Milvus collection {version.collection} holds "
              f"its {version.count} rows", highlight=False, soft_wrap=True)


@app.command("repair")
def repair_cmd(
    name: Annotated[str, typer.Argument(help="Index name.")],
    task: Annotated[str | None, typer.Option(
        show_default="the spec the index recorded",
        help="Task spec that loads the task now: package.module:Name or file.py:Name.")] = None,
    task_arg: Annotated[list[str] | None, typer.Option(
        metavar="KEY=VALUE", show_default="the arguments the index recorded",
        help="Constructor argument KEY=VALUE replacing the recorded one (JSON when it parses); "
             "repeatable.")] = None,
) -> None:
    """Re-point an index at its task (moved, renamed, or recorded by absolute path) and check
    that it loads the same model weights; no pass over the training data."""
    from .indexer.repair import repair

    done = repair(_settings(), name, task=task, task_args=parse_task_args(task_arg or []))
    err.print(f"index {name!r} version {done['version']} now loads its task from "
              f"{done['task']}", highlight=False, soft_wrap=True)


@app.command("delete")
def delete_cmd(name: Annotated[str, typer.Argument(help="Index name.")]) -> None:
    """Delete an index: its versions, rows and staged gradients."""
    from .indexer.admin import delete_index
    from .indexer.store import connect
    from .indexer.store.milvus import drop_orphan_collections, index_versions, milvus_uri

    settings = _settings()
    _, milvus = index_versions(connect(settings), name)
    delete_index(settings, name)
    if milvus:  # no version of it is left: every collection of it goes
        drop_orphan_collections(milvus_uri(settings.vector_store, settings.data_dir), name, [])
    err.print(f"index {name!r} deleted")


HostOption = Annotated[str | None, typer.Option(
    show_default="GRADINDEX_HOST, else 127.0.0.1", help="Address to listen on.")]
PortOption = Annotated[int | None, typer.Option(
    show_default="GRADINDEX_PORT, else 8000", help="Port to listen on (0: any free port).")]


@app.command("serve")
def serve_cmd(
    host: HostOption = None,
    port: PortOption = None,
    workers: Annotated[int | None, typer.Option(
        min=1, max=64, show_default="1, or GRADINDEX_WORKERS",
        help="Server processes sharing the port (each loads the models; the vectors are "
             "memory-mapped, so their pages are shared).")] = None,
) -> None:
    """Serve the indexes over HTTP (settings from GRADINDEX_*; API keys from `keys create`)."""
    from gradindex.server import ServerSettings

    extra: dict[str, Any] = {} if workers is None else {"workers": workers}
    _serve(ServerSettings(**_address(host, port), **extra))


def _address(host: str | None, port: int | None) -> dict[str, Any]:
    """The ``--host``/``--port`` given, as settings overrides (the rest come from the env)."""
    return {k: v for k, v in (("host", host), ("port", port)) if v is not None}


def check_listen(settings: ServerSettings) -> ServerSettings:
    """``settings`` with the port the server will get (a free one for port 0), after checking
    that its address can be listened on, so that no banner shows an address nobody serves.

    Raises:
        ConfigError: the address is taken or not this machine's.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            settings.host.strip("[]"), settings.port, type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            # as uvicorn binds: a port left in TIME_WAIT is free, one in use is not
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            port = int(sock.getsockname()[1])
    except OSError as exc:
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: "
                          f"{exc.strerror or exc}; choose another --port (or GRADINDEX_PORT)"
                          ) from None
    return settings if port == settings.port else settings.model_copy(update={"port": port})


def _serve(settings: ServerSettings, banner: Callable[[ServerSettings], None] | None = None
           ) -> None:
    """Check the address, show ``banner`` for it, then serve until interrupted."""
    from gradindex.server import run

    settings = check_listen(settings)
    logging.getLogger("server").setLevel(logging.INFO)
    if banner is not None:
        banner(settings)
    run(settings)


def demo_settings(*, host: str | None = None, port: int | None = None) -> ServerSettings:
    """The demo server's settings: ``--host``/``--port`` when given, else ``GRADINDEX_HOST``
    and ``GRADINDEX_PORT``, else 127.0.0.1:8000. On loopback the demo serves without API keys
    unless ``GRADINDEX_AUTH`` says otherwise.
    """
    from gradindex.server import ServerSettings
    from gradindex.server.settings import is_loopback

    overrides = _address(host, port)
    settings = ServerSettings(**overrides)
    if "GRADINDEX_AUTH" not in os.environ and is_loopback(settings.host):
        # Keyless: only the demo's own index, not others of the data directory that keys
        # protect elsewhere.
        settings = ServerSettings(**overrides, auth="off")
        if "GRADINDEX_SERVE_ONLY" not in os.environ:
            settings = settings.model_copy(update={"serve_only": DEMO_INDEX})
    return settings


def demo_url(settings: ServerSettings) -> str:
    """The address a browser on this machine opens for a server with ``settings``."""
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{settings.port}"


@app.command("demo")
def demo_cmd(
    build_only: Annotated[bool, typer.Option(
        "--build-only", help="Train and index, then exit without serving.")] = False,
    text: Annotated[bool, typer.Option(
        "--text", help="Also the text demo: a tiny GPT-2 trained here on arithmetic word "
                       "problems, indexed as 'arithmetic' (needs gradindex[hf]; minutes on a "
                       "CPU).")] = False,
    host: HostOption = None,
    port: PortOption = None,
) -> None:
    """Train the digits classifier, index it and serve it; a second run reuses what is built.

    On loopback the demo serves without API keys unless GRADINDEX_AUTH=on is set.
    """
    from .indexer.demo import prepare_demo

    server = None if build_only else demo_settings(host=host, port=port)  # fails before training
    settings = _settings()
    with _progress() as update:
        built = prepare_demo(settings, progress=update)
    err.print(f"index 'digits' {'built' if built else 'already built; reused'} in "
              f"{settings.data_dir}", highlight=False)
    if text:
        from .indexer.text_demo import prepare_text_demo

        with _progress() as update:
            built = prepare_text_demo(settings, progress=update)
        err.print(f"index 'arithmetic' {'built' if built else 'already built; reused'} in "
                  f"{settings.data_dir}", highlight=False)
    if server is not None:
        _serve(server, _demo_banner)


def _demo_banner(settings: ServerSettings) -> None:
    url = demo_url(settings)
    header = ("" if not settings.auth_required
              else " -H 'Authorization: Bearer <key from gradindex keys create>'")
    payload = json.dumps({"examples": [_first_test_digit()], "k": 5, "direction": "both"})
    out.print(f"\n[bold]gradindex demo[/] is at [link={url}]{url}[/]\n", highlight=False)
    out.print("Ask which training digits most helped and hurt a test digit:\n", highlight=False)
    out.print(f"curl -s {url}/v1/indexes/digits/influence{header} \\\n"
              f"  -H 'Content-Type: application/json' -d '{payload}'\n",
              highlight=False, markup=False, soft_wrap=True)


def _first_test_digit() -> dict[str, Any]:
    from .indexer.tasks import load_digits_split

    _, _, x_test, y_test = load_digits_split()
    return {"x": [round(float(v), 4) for v in x_test[0]], "y": int(y_test[0])}


@keys_app.command("create")
def keys_create(
    scope: Annotated[str, typer.Option(
        help="read (queries and look-ups) or admin (may also delete examples).")] = "read",
    name: Annotated[str, typer.Option(
        show_default="none", help="A label to tell keys apart.")] = "",
) -> None:
    """Create an API key and print its secret (shown this once only)."""
    from .indexer.store import connect, create_key

    key, secret = create_key(engine=connect(_settings()), scope=scope, name=name)
    err.print(f"key {key.id} ({key.scope}{', ' + key.name if key.name else ''}) created; "
              "store its secret now, it is not shown again:")
    out.print(secret, highlight=False, markup=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(
    all_keys: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
) -> None:
    """The API keys (never their secrets)."""
    from .indexer.store import connect, list_keys

    keys = list_keys(engine=connect(_settings()), include_revoked=all_keys)
    table = Table("id", "name", "scope", "prefix", "created", "revoked")
    for k in keys:
        table.add_row(str(k.id), k.name or "-", k.scope, k.prefix + "…",
                      str(k.created_at)[:19], str(k.revoked_at or "-")[:19])
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="The key's id.")]) -> None:
    """Revoke an API key for good."""
    from .indexer.store import connect, revoke_key

    key = revoke_key(engine=connect(_settings()), key_id=key_id)
    err.print(f"key {key.id} ({key.scope}) revoked")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head"
               ) -> None:
    """Migrate the database schema up (default: to the latest)."""
    from .indexer.store import upgrade

    upgrade(_settings(), revision)
    err.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "-1"
                 ) -> None:
    """Migrate the database schema down (default: one step)."""
    from .indexer.store import downgrade

    downgrade(_settings(), revision)
    err.print(f"database at {revision}")


def main() -> None:
    """Entry point of the ``gradindex`` script."""
    app(prog_name="gradindex")


if __name__ == "__main__":  # `python -m gradindex.cli`, as torchrun starts it
    main()
