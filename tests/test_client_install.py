"""The light distribution: ``pip wheel ./client`` holds the client package and nothing else,
and installed alone into a fresh virtual environment (no torch, no repository on the path) it
queries a real server and gets what this process's client gets."""

from __future__ import annotations

import email.parser
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import gradindex_client
import pytest
from gradindex_client import Client, NotFound

from gradindex.indexer.tasks import DigitsTask

from .conftest import REPO, SERVED_INDEX, LiveServer

PIP_TIMEOUT = 600
"""Seconds a pip command may take (it may download httpx, pydantic and setuptools)."""

CLIENT_SOURCE = REPO / "client"


def _queries(c: Client, name: str, payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """What both clients ask, as JSON; its source also runs in the venv (it needs only the
    client, and ``Any`` from typing)."""
    influence = c.influence(name, payloads, 5, direction="both")
    ids = [h.id for h in influence.results[0].proponents]
    out: dict[str, Any] = {
        "health": c.health().model_dump(mode="json"),
        "indexes": [i.model_dump(mode="json") for i in c.indexes()],
        "index": c.index(name).model_dump(mode="json"),
        "influence": influence.model_dump(mode="json"),
        "scores": c.scores(name, payloads, ids=ids).model_dump(mode="json"),
        "select": c.select(name, payloads, 5).model_dump(mode="json"),
        "self_influence": c.self_influence(name, limit=5).model_dump(mode="json"),
        "example": c.example(name, ids[0]).model_dump(mode="json"),
    }
    try:
        c.index("no-such-index")
    except NotFound as exc:
        out["not_found"] = [exc.status, exc.type, exc.message]
    return out


SCRIPT_HEAD = """\
import json, sys
from typing import Any

import gradindex_client
from gradindex_client import Client, NotFound
"""
SCRIPT_MAIN = """\
name, payloads = sys.argv[1], json.loads(open(sys.argv[2]).read())
with Client() as c:  # GRADINDEX_URL and GRADINDEX_API_KEY
    out = {"module": gradindex_client.__file__, **_queries(c, name, payloads)}
print(json.dumps(out))
"""
"""The script the venv runs: :func:`_queries` between these two, printing JSON."""


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what could point Python at the repository."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
           and not k.startswith("GRADINDEX_")}
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


def _run(args: list[str], cwd: Path, timeout: float = PIP_TIMEOUT,
         **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=_clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def _pip_failed(what: str, done: subprocess.CompletedProcess[str]) -> str:
    return (f"{what} failed (exit {done.returncode}). pip needs a package index (PyPI or a "
            "mirror) or its cache for setuptools, httpx and pydantic; check that one is "
            f"reachable.\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}")


@pytest.fixture(scope="session")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel ./client``, built once per session from a copy (the checkout stays clean)."""
    work = tmp_path_factory.mktemp("client-wheel")
    source = work / "client"
    shutil.copytree(CLIENT_SOURCE, source, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", "__pycache__"))
    done = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir",
                 str(work / "dist"), str(source)], cwd=work)
    if done.returncode != 0:
        pytest.fail(_pip_failed("pip wheel ./client", done))
    wheels = sorted((work / "dist").glob("*.whl"))
    assert [w.name for w in wheels] == [
        f"gradindex_client-{gradindex_client.__version__}-py3-none-any.whl"]
    return wheels[0]


@pytest.fixture(scope="session")
def client_venv(client_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a plain new venv with only the client wheel (and its dependencies)."""
    root = tmp_path_factory.mktemp("client-venv")
    done = _run([sys.executable, "-m", "venv", str(root / "venv")], cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    python = root / "venv" / "bin" / "python"
    done = _run([str(python), "-m", "pip", "install", "--no-input", str(client_wheel)],
                cwd=root)
    if done.returncode != 0:
        pytest.fail(_pip_failed("pip install gradindex-client into a fresh venv", done))
    return python


def test_the_wheel_holds_only_the_client_and_needs_only_httpx_and_pydantic(
        client_wheel: Path) -> None:
    version = gradindex_client.__version__
    info = f"gradindex_client-{version}.dist-info/"
    with zipfile.ZipFile(client_wheel) as wheel:
        names = wheel.namelist()
        metadata = email.parser.Parser().parsestr(wheel.read(info + "METADATA").decode())
    outside = [n for n in names if not n.startswith(("gradindex_client/", info))]
    assert outside == []
    shipped = {n.removeprefix("gradindex_client/") for n in names
               if n.startswith("gradindex_client/")}
    assert shipped == {p.name for p in (CLIENT_SOURCE / "gradindex_client").glob("*.py")}
    assert (metadata["Name"], metadata["Version"]) == ("gradindex-client", version)
    requires = {}
    for line in metadata.get_all("Requires-Dist", []):
        name = re.match(r"[A-Za-z0-9._-]+", line)
        assert name is not None, line
        requires[name.group(0).lower()] = line.partition(";")[2].strip()
    assert requires == {"httpx": "", "pydantic": "", "pandas": 'extra == "pandas"'}
    assert metadata.get_all("Provides-Extra") == ["pandas"]
    # The README is the long description: the install line and both environment variables.
    assert metadata["Description-Content-Type"] == "text/markdown"
    readme = metadata.get_payload()
    assert "pip install ./client" in readme
    assert "GRADINDEX_URL" in readme and "GRADINDEX_API_KEY" in readme


def test_the_client_installed_alone_queries_a_real_server_like_this_process(
        client_venv: Path, live_server: LiveServer, server_keys: dict[str, str],
        store_task: DigitsTask, tmp_path: Path) -> None:
    venv = client_venv.parents[1]
    done = _run([str(client_venv), "-I", "-c", "import torch"], cwd=tmp_path, timeout=60)
    assert done.returncode == 1 and "No module named 'torch'" in done.stderr, done.stderr
    others = ["numpy", "faiss", "gradindex", "pandas"]
    heavy = f"import importlib.util as u; print([m for m in {others} if u.find_spec(m)])"
    done = _run([str(client_venv), "-I", "-c", heavy], cwd=tmp_path, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr

    payloads = store_task.test_payloads(2)
    (tmp_path / "payloads.json").write_text(json.dumps(payloads))
    script = "\n\n".join([SCRIPT_HEAD, inspect.getsource(_queries), SCRIPT_MAIN])
    (tmp_path / "query.py").write_text(script)
    done = _run([str(client_venv), "-I", "query.py", SERVED_INDEX, "payloads.json"],
                cwd=tmp_path, timeout=120, GRADINDEX_URL=live_server.url,
                GRADINDEX_API_KEY=server_keys["read"])
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert Path(got.pop("module")).is_relative_to(venv)  # the installed copy, not the repo's

    with Client(live_server.url, api_key=server_keys["read"]) as c:
        want = _queries(c, SERVED_INDEX, payloads)
    assert got == want
    assert len(got["influence"]["results"]) == 2
    assert got["not_found"][:2] == [404, "IndexNotFound"]
