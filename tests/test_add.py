"""`gradindex add`: new examples into a published index, with the old preconditioner, without
a pass over the old examples; a later refinalize refits on everything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from gradindex import BuildConfig, Settings, build, open_index, refinalize
from gradindex.cli import app
from gradindex.indexer.append import add
from gradindex.indexer.errors import ConfigError
from gradindex.indexer.precondition import Preconditioner
from gradindex.indexer.store import ExampleRow, connect, current_version
from gradindex.indexer.task import TaskSpec

from .conftest import STORE_TASK_ARGS

PART_TASK = '''
from gradindex.indexer.tasks import DigitsTask


class Part(DigitsTask):
    """The first `limit` training examples of the digits task (same model whatever the limit)."""

    def __init__(self, limit, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def __len__(self):
        return self.limit

    def examples(self):
        for n, example in enumerate(super().examples()):
            if n == self.limit:
                return
            yield example
'''

SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=False)


@pytest.fixture
def part(tmp_path: Path) -> str:
    path = tmp_path / "part_task.py"
    path.write_text(PART_TASK)
    return f"{path}:Part"


def spec(part: str, limit: int, **extra: object) -> TaskSpec:
    return TaskSpec(part, {**STORE_TASK_ARGS, "limit": limit, **extra})


def version_dir(settings: Settings, name: str) -> Path:
    with Session(connect(settings)) as session:
        return settings.data_dir / current_version(session=session, name=name).path


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=False)
def test_add_equals_a_rebuild_under_the_same_preconditioner(settings: Settings, part: str) -> None:
    total = STORE_TASK_ARGS["train_size"]
    old = total - 60
    build(BuildConfig(name="grow", task=part, task_args={**STORE_TASK_ARGS, "limit": old}),
          settings)
    before = version_dir(settings, "grow")
    v1 = np.load(before / "vectors.npy")
    precond = Preconditioner.load(before / "precond.npz")
    index = open_index("grow", settings)
    gone = index.search(np.asarray(v1[:1]), 1)[0][0].external_id
    index.delete(gone)

    done = add(settings, "grow", spec(part, total))
    assert (done.version, done.added, done.skipped) == (2, total - old, old)
    after = version_dir(settings, "grow")
    v2 = np.load(after / "vectors.npy")
    assert v2.shape == (total, v1.shape[1])
    assert np.array_equal(v2[:old], v1)  # old vectors copied, not recomputed

    # the same examples built at once, then preconditioned with the old index's preconditioner
    build(BuildConfig(name="full", task=part, task_args={**STORE_TASK_ARGS, "limit": total}),
          settings)
    from gradindex.indexer.stage import staging_root
    from gradindex.indexer.staging import Staging

    full_staging = next(p for p in staging_root(settings, "full").iterdir())
    raw = np.concatenate([w.raw for w in Staging(full_staging).windows(4096)])
    import torch

    expected = precond.apply(torch.from_numpy(raw)).numpy()
    # float32 products of other shapes (60 rows, not all at once) round differently: within
    # the preconditioner's documented float32 error (FLOAT32_MAX_CONDITION), of the vectors' scale
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(v2[old:], expected[old:], rtol=0, atol=1e-5 * scale)

    with Session(connect(settings)) as session:
        version = current_version(session=session, name="grow")
        rows = session.scalars(select(ExampleRow).where(ExampleRow.version_id == version.id)
                               .order_by(ExampleRow.position)).all()
    assert [r.position for r in rows] == list(range(total))
    assert [r.external_id for r in rows if r.deleted] == [gone]  # deletes and adds compose
    assert len({r.external_id for r in rows}) == total
    grown = open_index("grow", settings)
    found = {h.external_id for d in ("proponents", "opponents")
             for h in grown.search(np.asarray(v2[:1]), total, direction=d)[0]}
    assert gone not in found and len(found) == total - 1  # every live example, old and new
    threes = grown.search(np.asarray(v2[:1]), total, filter={"label": 3})[0]  # schema kept
    assert threes and {h.meta["label"] for h in threes} == {3}
    assert any(int(h.external_id.split("-")[1]) >= old for h in threes)  # added ones match

    # nothing new: no new version
    again = add(settings, "grow", spec(part, total))
    assert (again.version, again.added, again.skipped) == (None, 0, total)

    # refinalize refits the Fisher on everything: the index equals the full build
    refinalize(settings, "grow")
    refit = np.load(version_dir(settings, "grow") / "vectors.npy")
    full = np.load(version_dir(settings, "full") / "vectors.npy")
    np.testing.assert_allclose(refit, full, rtol=1e-5, atol=1e-6)


@SQLITE
def test_add_refuses_another_model_and_leaves_the_index(settings: Settings, part: str) -> None:
    build(BuildConfig(name="grow", task=part, task_args={**STORE_TASK_ARGS, "limit": 200}),
          settings)
    with pytest.raises(ConfigError, match="not the one index 'grow' was built from"):
        add(settings, "grow", spec(part, 260, seed=1))
    assert open_index("grow", settings).version == 1
    # an add killed after staging a chunk, before recording it: the next add starts clean
    from gradindex.indexer.stage import staging_root
    from gradindex.indexer.staging import Staging

    staging = Staging(next(staging_root(settings, "grow").iterdir()))
    dim = np.load(version_dir(settings, "grow") / "vectors.npy").shape[1]
    staging.writer(0, 1).write([200, 201], np.zeros((2, dim), np.float32),
                               [{"id": "x", "payload": {}, "meta": {}}] * 2)
    done = add(settings, "grow", spec(part, 230))
    assert (done.version, done.added) == (2, 30) and open_index("grow", settings).count == 230


@SQLITE
def test_cli_add_says_what_it_did(settings: Settings, part: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADINDEX_DATA_DIR", str(settings.data_dir))
    monkeypatch.delenv("GRADINDEX_DATABASE_URL", raising=False)
    build(BuildConfig(name="grow", task=part, task_args={**STORE_TASK_ARGS, "limit": 250}),
          settings)
    args = ["add", "grow", "--task", part, "--task-arg", "limit=300"]
    for key, value in STORE_TASK_ARGS.items():
        args += ["--task-arg", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "version 2 published: 50 examples added (250 already indexed)" in result.stderr
    assert open_index("grow", settings).count == 300
