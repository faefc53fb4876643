"""The deployment files: the Dockerfile and the compose files say what the README promises."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True
    ).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


MILVUS_SERVICES = {"milvus", "milvus-etcd", "milvus-minio"}


@pytest.mark.parametrize(("files", "profile"), [
    (["docker-compose.yml"], None),
    (["docker-compose.yml", "docker-compose.gpu.yml"], None),
    (["docker-compose.yml"], "milvus"),
])
def test_compose_config_accepts_the_files(files: list[str], profile: str | None) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed here "
                    "(.ci/run installs Debian's docker-compose)")
    args = [a for f in files for a in ("-f", str(ROOT / f))]
    if profile is not None:
        args += ["--profile", profile]
    result = subprocess.run([*cli, *args, "config"], capture_output=True, text=True,
                            cwd=ROOT, env={"PATH": "/usr/bin:/bin:/usr/local/bin"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    # (docker-compose 1.x lists every service; `docker compose` only the active profiles')
    assert MILVUS_SERVICES <= set(services) or profile is None
    assert all(services[name]["profiles"] == ["milvus"]
               for name in MILVUS_SERVICES & set(services))


def test_compose_services_health_checks_and_variables() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "api", "indexer"} | MILVUS_SERVICES
    # without a profile only gradindex's own services start
    assert {n for n, s in services.items() if not s.get("profiles")} == {
        "postgres", "migrate", "api", "indexer"}

    pg = services["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.startswith("pgdata:") for v in pg["volumes"])
    assert "pgdata" in compose["volumes"] and "data" in compose["volumes"]

    migrate = services["migrate"]  # the one place the schema is migrated
    assert " ".join(migrate["command"]).endswith("db upgrade") and migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    api = services["api"]
    assert "/v1/health" in " ".join(api["healthcheck"]["test"])
    assert "serve" in " ".join(api["command"]) and "upgrade" not in " ".join(api["command"])
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert api["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    indexer = services["indexer"]
    assert indexer["restart"] == "no" and "demo --build-only" in " ".join(indexer["command"])
    assert indexer["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # a user's task reaches the indexer read-only; the api needs only the data volume, where
    # the build copied the task file and its weights
    assert any(v.endswith(":/tasks:ro") for v in indexer["volumes"])
    assert api["volumes"] == ["data:/data"]
    for svc in (api, indexer, migrate):
        env = svc["environment"]
        assert env["GRADINDEX_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["GRADINDEX_DATA_DIR"] == "/data"
        # configuration only through GRADINDEX_* variables
        assert all(key.startswith("GRADINDEX_") for key in env)
    assert "data:/data" in indexer["volumes"]

    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    for name in ("api", "indexer"):  # the services that compute gradients
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_dockerfile_is_slim_non_root_cpu_by_default() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=\S+/cpu$", text, re.M)  # CPU torch by default
    assert re.search(r"^USER gradindex$", text, re.M)
    assert "useradd" in text and "HEALTHCHECK" in text and "/v1/health" in text
    assert re.search(r"^ENV .*GRADINDEX_DATA_DIR=/data", text, re.M | re.S)
    assert "COPY gradindex ./gradindex" in text  # the migrations ship inside the package
    assert re.search(r"^RUN pip install \. ", text, re.M) and "pip install -e" not in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".gradindex" in ignored


def test_milvus_profile_is_milvus_standalone_and_the_api_points_at_it() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in MILVUS_SERVICES:
        assert services[name]["profiles"] == ["milvus"]
        assert services[name]["healthcheck"]["test"]
        assert name in compose["volumes"]  # its data outlives the container
    milvus = services["milvus"]
    assert milvus["image"].startswith("milvusdb/milvus:v2.")
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert "9091/healthz" in " ".join(milvus["healthcheck"]["test"])
    assert milvus["environment"]["ETCD_ENDPOINTS"] == "milvus-etcd:2379"
    assert milvus["environment"]["MINIO_ADDRESS"] == "milvus-minio:9000"
    for dep in ("milvus-etcd", "milvus-minio"):
        assert milvus["depends_on"][dep]["condition"] == "service_healthy"
    assert services["milvus-etcd"]["image"].startswith("quay.io/coreos/etcd:")
    assert services["milvus-minio"]["image"].startswith("minio/minio:")
    # the server and the indexer reach it by its service name (a milvus-lite file cannot be
    # shared by two processes), and their image carries pymilvus
    for name in ("api", "indexer"):
        env = services[name]["environment"]
        assert env["GRADINDEX_VECTOR_STORE"] == "${GRADINDEX_VECTOR_STORE:-http://milvus:19530}"
        assert services[name]["build"]["args"]["EXTRAS"] == "milvus"
    assert 'pip install ".[$EXTRAS]"' in (ROOT / "Dockerfile").read_text()
