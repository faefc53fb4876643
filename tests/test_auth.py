"""API keys: hashed storage, scopes, revocation, the `keys` commands, the migration, and the
rule that a server beyond loopback always requires keys."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from gradindex_client import AuthenticationError, Client, NotFound, PermissionDenied
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from gradindex import Settings
from gradindex.cli import app
from gradindex.indexer.errors import ConfigError
from gradindex.indexer.store import (
    ApiKey,
    ExampleRow,
    connect,
    downgrade,
    hash_secret,
    upgrade,
    verify_key,
)
from gradindex.indexer.store.db import dispose_engines, tables
from gradindex.server import ServerSettings

from .conftest import SERVED_INDEX, LiveServer, make_key, storage_env

EXAMPLE = {"x": [0.0] * 64, "y": 0}


def test_requests_without_a_valid_key_get_401(live_server: LiveServer) -> None:
    anonymous = Client(live_server.url, api_key="", retries=0)
    with pytest.raises(AuthenticationError, match="needs an API key") as info:
        anonymous.indexes()
    assert info.value.status == 401
    with (pytest.raises(AuthenticationError, match="unknown or revoked"),
          Client(live_server.url, api_key="gik_not-a-key", retries=0) as stranger):
        stranger.influence(SERVED_INDEX, [EXAMPLE])
    raw = httpx.get(f"{live_server.url}/v1/indexes/{SERVED_INDEX}")
    assert raw.status_code == 401 and raw.headers["WWW-Authenticate"] == "Bearer"
    assert raw.json()["error"]["type"] == "Unauthorized"
    # unauthenticated requests learn nothing, not even whether an index exists
    assert httpx.get(f"{live_server.url}/v1/indexes/nope").status_code == 401
    assert anonymous.health().status == "ok"  # health and metrics stay open
    assert "gradindex_requests_total" in anonymous.metrics()
    anonymous.close()


def test_read_key_cannot_delete_and_admin_key_can(
    live_server: LiveServer, server_settings: Settings, server_keys: dict[str, str]
) -> None:
    with Client(live_server.url, api_key=server_keys["read"], retries=0) as reader:
        assert reader.example(SERVED_INDEX, "train-11").id == "train-11"
        with pytest.raises(PermissionDenied, match="scope 'admin'") as info:
            reader.delete(SERVED_INDEX, "train-11")
        assert info.value.status == 403
        assert reader.example(SERVED_INDEX, "train-11").id == "train-11"  # nothing changed
        try:
            with Client(live_server.url, api_key=server_keys["admin"], retries=0) as admin:
                assert admin.delete(SERVED_INDEX, "train-11").id == "train-11"
            with pytest.raises(NotFound):
                reader.example(SERVED_INDEX, "train-11")
            found = reader.influence(SERVED_INDEX, [reader.example(SERVED_INDEX, "train-12")
                                                    .payload], k=300)
            assert "train-11" not in {h.id for h in found.results[0].proponents}
        finally:  # the session's server is shared: bring the example back for the others
            with Session(connect(server_settings)) as session, session.begin():
                session.execute(update(ExampleRow).where(ExampleRow.external_id == "train-11")
                                .values(deleted=False))


def test_revoked_key_gets_401(live_server: LiveServer, server_settings: Settings) -> None:
    key_id, secret = make_key(server_settings, "read", "short-lived")
    with Client(live_server.url, api_key=secret, retries=0) as c:
        assert c.indexes()
        env = storage_env(server_settings)
        result = CliRunner().invoke(app, ["keys", "revoke", str(key_id)], env=env)
        assert result.exit_code == 0, result.output
        with pytest.raises(AuthenticationError, match="unknown or revoked"):
            c.indexes()
    result = CliRunner().invoke(app, ["keys", "revoke", str(key_id)], env=env)
    assert result.exit_code == 1 and "no active API key" in result.output


def test_keys_commands_store_only_hashes(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    env = storage_env(settings)
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--scope", "admin", "--name", "ops"],
                            env=env)
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("gik_") and len(secret) > 40
    engine = connect(settings)
    with Session(engine) as session:
        row = session.scalars(select(ApiKey)).one()
    assert row.key_hash == hash_secret(secret) and secret not in (row.key_hash, row.prefix)
    key = verify_key(engine=engine, secret=secret)
    assert key is not None and key.scope == "admin" and key.allows("read")
    listed = runner.invoke(app, ["keys", "list"], env=env)
    assert listed.exit_code == 0 and "ops" in listed.output and secret not in listed.output
    bad = runner.invoke(app, ["keys", "create", "--scope", "root"], env=env)
    assert bad.exit_code == 1 and "`scope` must be one of ['read', 'admin']" in bad.output
    dispose_engines()


def test_api_keys_migration_downgrades_and_upgrades(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    engine = connect(settings)
    assert "api_keys" in tables(engine)
    downgrade(settings, "0001")
    assert "api_keys" not in tables(engine) and "examples" in tables(engine)
    upgrade(settings)
    assert "api_keys" in tables(engine)
    dispose_engines()


def test_keys_are_required_beyond_loopback(tmp_path: Path) -> None:
    assert ServerSettings(host="127.0.0.1", auth="off").auth_required is False
    assert ServerSettings(host="::1", auth="off").auth_required is False
    assert ServerSettings(host="0.0.0.0").auth_required
    assert ServerSettings().auth == "on"  # on loopback too, unless turned off explicitly
    with pytest.raises(ConfigError, match="`auth` must be 'on'"):
        ServerSettings(host="0.0.0.0", auth="off")
    env = {**storage_env(Settings(data_dir=tmp_path)), "GRADINDEX_AUTH": "off"}
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"], env=env)
    assert result.exit_code == 1 and "`auth` must be 'on'" in result.output
