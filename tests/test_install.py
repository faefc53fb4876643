"""What users install: the built wheel in a clean virtual environment, run from another folder.

The wheel (not the editable checkout) is installed into a new venv with its dependencies, then
`gradindex db upgrade` migrates a scratch PostgreSQL database from the migrations shipped inside
the package, `gradindex demo --build-only` trains and indexes, and `gradindex serve` answers a
query over HTTP with the same scores as the checkout's reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
import pytest

from gradindex import Settings, open_index
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.tasks import load_digits_split

from .conftest import REPO, free_port

INSTALL_TIMEOUT = 900


def _pip(python: Path, *args: str) -> None:
    done = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH, nothing of this checkout."""
    keep = {k: v for k, v in os.environ.items()
            if k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
                     "PIP_FIND_LINKS", "PIP_CONSTRAINT")}
    return {**keep, "PATH": "/usr/local/bin:/usr/bin:/bin", **extra}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from the checkout."""
    out = tmp_path_factory.mktemp("wheel")
    _pip(Path(sys.executable), "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(out), str(REPO))
    (found,) = out.glob("gradindex-*.whl")
    return found


@pytest.fixture(scope="session")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding the wheel and its dependencies (torch pinned to this one's, so pip
    takes the local CPU build); its ``bin`` folder."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    _pip(python, "install", "-q", f"torch=={metadata.version('torch')}")
    _pip(python, "install", "-q", str(wheel))
    return venv / "bin"


def test_the_wheel_ships_one_namespace_with_its_migrations_and_page(wheel: Path) -> None:
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("gradindex-")}
    assert tops == {"gradindex", "gradindex_client"}
    for shipped in ("gradindex/migrations/alembic.ini", "gradindex/migrations/env.py",
                    "gradindex/migrations/script.py.mako", "gradindex/server/static/index.html",
                    "gradindex/server/static/page.js", "gradindex/server/static/favicon.ico"):
        assert shipped in names
    assert sum(n.startswith("gradindex/migrations/versions/0") for n in names) >= 2


def _serve(bin_dir: Path, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with open(cwd / "serve.log", "wb") as log:  # the child keeps its own copy of the handle
        proc = subprocess.Popen([str(bin_dir / "gradindex"), "serve", "--port", str(port)],
                                cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError((cwd / "serve.log").read_text())
        try:
            if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("the installed server did not start:\n" + (cwd / "serve.log").read_text())


def test_wheel_migrates_builds_and_serves_from_another_folder(
    installed: Path, pg_databases: Callable[[], str], tmp_path: Path
) -> None:
    url = pg_databases()
    elsewhere = tmp_path / "a user's folder"
    elsewhere.mkdir()
    data = tmp_path / "data"
    env = clean_env(GRADINDEX_DATA_DIR=str(data), GRADINDEX_DATABASE_URL=url,
                    GRADINDEX_AUTH="off")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(installed / "gradindex"), *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=600)

    refused = run("list")  # PostgreSQL is never migrated behind the user's back
    assert refused.returncode == 1 and "gradindex db upgrade" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert run("db", "upgrade").returncode == 0
    built = run("demo", "--build-only")
    assert built.returncode == 0, built.stderr
    modules = subprocess.run(
        [str(installed / "python"), "-c",
         "import gradindex, gradindex.server, gradindex_client; print(gradindex.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert "site-packages" in modules.stdout, modules.stderr  # the wheel, not the checkout

    _, _, x_test, y_test = load_digits_split()
    payloads = [{"x": [float(v) for v in x_test[i]], "y": int(y_test[i])} for i in range(3)]
    proc, base = _serve(installed, elsewhere, env)
    try:
        answer = httpx.post(f"{base}/v1/indexes/digits/influence",
                            json={"examples": payloads, "k": 5}, timeout=60)
        assert answer.status_code == 200, answer.text
        page = httpx.get(base + "/", timeout=10)
        assert page.status_code == 200 and "gradindex" in page.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # The checkout's reader over the same data gives the same answer.
    settings = Settings(data_dir=data, database_url=url)
    index = open_index("digits", settings)
    reference = index.search(query_vectors(featurizer_for(index), payloads), 5)
    got = answer.json()["results"]
    for result, hits in zip(got, reference, strict=True):
        assert [h["id"] for h in result["proponents"]] == [h.external_id for h in hits]
        np.testing.assert_allclose([h["score"] for h in result["proponents"]],
                                   [h.score for h in hits], rtol=1e-4, atol=1e-6)
    assert json.loads(json.dumps(got))  # plain JSON all the way through
