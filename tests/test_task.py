"""Loading tasks from specs, and the clear errors a broken task or spec gets."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gradindex import CompressionConfig, Featurizer, TaskError, load_task
from gradindex.indexer.errors import NonFiniteLoss
from gradindex.indexer.task import TaskSpec
from gradindex.indexer.tasks import DigitsTask

from .factories import MeanLossTask, NanLossTask


def test_load_task_from_module_spec_with_arguments() -> None:
    task = load_task("gradindex.indexer.tasks:DigitsTask", model="logreg", train_size=50)
    assert isinstance(task, DigitsTask)
    assert len(list(task.examples())) == 50


def test_load_task_from_file_that_imports_its_neighbour(tmp_path: Path) -> None:
    (tmp_path / "helper_mod_for_task.py").write_text("SIZE = 7\n")
    (tmp_path / "my_task.py").write_text(textwrap.dedent("""
        from helper_mod_for_task import SIZE
        from gradindex.indexer.tasks import DigitsTask

        class Small(DigitsTask):
            def __init__(self, scale=1):
                super().__init__("logreg", train_size=SIZE * scale)
    """))
    spec = TaskSpec(f"{tmp_path}/../{tmp_path.name}/my_task.py:Small", {"scale": 2})
    assert spec.spec == f"{tmp_path.resolve()}/my_task.py:Small"  # made absolute for manifests
    assert len(list(spec.load().examples())) == 14


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "must look like"),
        ("gradindex.indexer.tasks:", "must look like"),
        ("not_a_module_xyz:Task", "cannot import module"),
        ("gradindex.indexer.tasks:NoSuchTask", "has no attribute 'NoSuchTask'"),
        ("gradindex.indexer.tasks:load_digits_split", "not a task class"),
        ("gradindex.indexer.errors:TaskError", "lacks required methods"),
        ("/nonexistent/dir/task.py:Task", "does not exist"),
    ],
)
def test_bad_specs_raise_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        load_task(spec)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(TaskError, match="rejected its arguments"):
        load_task("gradindex.indexer.tasks:DigitsTask", colour="blue")


def test_task_file_that_fails_to_import(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(TaskError, match="boom"):
        load_task(f"{tmp_path}/broken.py:Task")


@pytest.mark.parametrize("compressor", ["factorized-dropout", "dropout"])
def test_loss_that_is_not_per_example(compressor: str) -> None:
    task = MeanLossTask()
    feat = Featurizer(task, CompressionConfig(compressor=compressor, keep=0.5), device="cpu")
    with pytest.raises(TaskError, match=r"one value per example, shape \[4"):
        feat.raw([p for _, p in task.examples()][:4])


@pytest.mark.parametrize("compressor", ["factorized-dropout", "gaussian"])
def test_nan_loss_names_the_examples(compressor: str) -> None:
    task = NanLossTask()
    payloads = [p for _, p in task.examples()][:6]
    bad = [i for i, p in enumerate(payloads) if p["y"] == 2]
    assert bad, "the fixture must contain a label-2 example"
    feat = Featurizer(task, CompressionConfig(compressor=compressor, keep=0.5), device="cpu")
    with pytest.raises(NonFiniteLoss, match="NaN or infinite") as info:
        feat.raw(payloads)
    assert info.value.args[1] == bad


def test_payload_the_task_rejects(logreg_task) -> None:
    feat = Featurizer(logreg_task, CompressionConfig(keep=0.5), device="cpu")
    with pytest.raises(TaskError, match="list of 64 numbers"):
        feat.raw([{"x": [1.0, 2.0], "y": 1}])
    with pytest.raises(TaskError, match=r"'y' must be an integer in \[0, 10\)"):
        feat.raw([{"x": [0.0] * 64, "y": 12}])
    with pytest.raises(TaskError, match="no examples"):
        feat.raw([])


def test_model_without_linear_layers() -> None:
    import torch

    class NoLinear(MeanLossTask):
        def model(self):
            return torch.nn.Sequential(torch.nn.Tanh())

    with pytest.raises(TaskError, match="no module to attribute"):
        Featurizer(NoLinear(), CompressionConfig(keep=0.5), device="cpu")


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_trained_digits_weights_do_not_depend_on_the_thread_count(kind: str) -> None:
    """A server's worker processes run fewer torch threads than the build did: the model a
    built-in task trains at load must come out the same, or the index is refused as built
    from other weights."""
    import torch

    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            net = DigitsTask(model=kind, train_size=300).model()
            weights.append({k: v.clone() for k, v in net.state_dict().items()})
            assert torch.get_num_threads() == threads  # training leaves the setting as it was
    finally:
        torch.set_num_threads(before)
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
