"""Staged windows read back across chunks and shards, by positioned reads of the chunks' files."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from gradindex.indexer.stage import BatchAccumulator, ChunkFlusher, StagedBatch
from gradindex.indexer.staging import Staging

DIM = 5
TOTAL = 23
FISHER_AT = (1, 9, 13, 21)
"""Positions with Fisher rows (a bounded Fisher's subset)."""
R = 2


def _raw(positions: list[int]) -> np.ndarray:
    rows = [[p * 10.0 + j for j in range(DIM)] for p in positions]
    return np.asarray(rows, dtype=np.float32).reshape(len(positions), DIM)


def _fisher(positions: list[int]) -> np.ndarray:
    return -np.repeat(_raw(positions)[:, None, :], R, axis=1)


@pytest.fixture()
def staging(tmp_path: Path) -> Staging:
    """Two shards of batches of 4 (round robin), in chunks of uneven sizes; a duplicate of
    position 5 in a later chunk, which the first chunk's copy wins over. Longer chunks are
    handed to the writer in parts (as a build hands it its batches), some of them views."""
    staging = Staging(tmp_path / "staging")
    staging.init({"layout": {"dim": DIM}})
    chunks = {0: [[0, 1, 2, 3, 8, 9, 10, 11], [16, 17, 18, 19]],
              1: [[4, 5, 6, 7], [12, 13, 14, 15, 20, 21, 22], [5]]}
    for shard, parts in chunks.items():
        writer = staging.writer(shard, 2)
        for positions in parts:
            fpos = [p for p in positions if p in FISHER_AT]
            raw: np.ndarray | list[np.ndarray] = (
                _raw(positions) + (1000.0 if positions == [5] else 0.0))
            fisher: np.ndarray | list[np.ndarray] = _fisher(fpos)
            if len(positions) > 4:
                raw = [raw[:3], raw[3:]]
                fisher = [np.asfortranarray(f) for f in np.split(fisher, len(fpos))]
            writer.write(positions, raw, [{"id": f"ex-{p}", "payload": {"p": p}}
                                          for p in positions], fisher, fpos)
        staging.mark_shard_done(shard, 2, TOTAL)
    return staging


@pytest.mark.parametrize("window", [1, 3, 4, 8, 23, 100])
@pytest.mark.parametrize("start", [0, 6])
def test_windows_are_positions_in_order_whatever_the_chunks(staging: Staging, window: int,
                                                            start: int) -> None:
    windows = list(staging.windows(window, start=start))
    assert [(w.start, w.stop) for w in windows] == [
        (lo, min(lo + window, TOTAL)) for lo in range(start, TOTAL, window)]
    expected = list(range(start, TOTAL))
    raw = np.concatenate([w.raw for w in windows])
    assert raw.dtype == np.float32
    np.testing.assert_array_equal(raw, _raw(expected))
    assert [r["id"] for w in windows for r in w.records] == [f"ex-{p}" for p in expected]
    members = [p for p in FISHER_AT if p >= start]
    fpos = np.concatenate([w.fisher_positions for w in windows
                           if w.fisher_positions is not None])
    np.testing.assert_array_equal(fpos, members)
    fisher = np.concatenate([w.fisher for w in windows if w.fisher is not None])
    np.testing.assert_array_equal(fisher, _fisher(members))
    for w in windows:
        assert w.fisher is not None and w.fisher.shape[1:] == (R, DIM)
        inside = [p - w.start for p in members if w.start <= p < w.stop]
        assert np.flatnonzero(w.fisher_members()).tolist() == inside


def test_a_window_is_private_and_reused_windows_share_their_arrays(staging: Staging) -> None:
    """Positions 16-19 are one slice of one chunk: read into a writable array of the window's
    own (torch takes it without a warning); writing to it leaves the staged file as it was.
    With ``reuse`` every window is read into the same arrays, without the records."""
    window = next(iter(staging.windows(4, start=16)))
    assert window.raw.flags.writeable and window.raw.flags.c_contiguous
    window.raw[:] = 0
    again = next(iter(staging.windows(4, start=16)))
    np.testing.assert_array_equal(again.raw, _raw([16, 17, 18, 19]))
    seen = []
    for w in staging.windows(8, reuse=True, records=False):
        np.testing.assert_array_equal(w.raw, _raw(list(range(w.start, w.stop))))
        assert w.records == []
        seen.append(w.raw)
    assert all(np.shares_memory(seen[0], other) for other in seen[1:])


def test_a_truncated_chunk_is_an_error_not_zeros(staging: Staging) -> None:
    chunk = next(d for d in staging.chunk_dirs() if len(np.load(d / "positions.npy")) == 8)
    path = chunk / "raw.npy"
    path.write_bytes(path.read_bytes()[:-DIM * 4])
    with pytest.raises(Exception, match="ended early|rows"):
        list(staging.windows(100))


def test_rows_file_writes_blocks_in_any_order_into_a_loadable_npy(tmp_path: Path) -> None:
    from gradindex.indexer.store.files import RowsFile

    rows = np.arange(7 * DIM, dtype=np.float32).reshape(7, DIM)
    buffer = np.empty((3, DIM), dtype=np.float32)
    with RowsFile(tmp_path / "v.npy", (9, DIM)) as out:
        for start in (3, 0, 6):  # one reused buffer, written out of order
            n = min(3, 7 - start)
            buffer[:n] = rows[start : start + n]
            out.put(start, buffer[:n])
        with pytest.raises(ValueError, match="do not fit"):
            out.put(8, rows[:2])
    got = np.load(tmp_path / "v.npy", mmap_mode="r")
    assert got.shape == (9, DIM) and got.dtype == np.float32
    np.testing.assert_array_equal(got[:7], rows)
    np.testing.assert_array_equal(got[7:], 0)  # never put: zeros


# ----------------------------------------------------------------------------- chunk flusher


def _batch(positions: list[int]) -> StagedBatch:
    return StagedBatch(positions, _raw(positions),
                       [{"id": f"ex-{p}", "payload": {"p": p}} for p in positions], None, [])


def test_chunks_are_written_on_a_second_thread_and_reported_in_order(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging")
    staging.init({"layout": {"dim": DIM}})
    reported: list[tuple[int, int, int]] = []

    def on_chunk(chunks: int, written: int) -> None:
        reported.append((chunks, written, threading.get_ident()))
        # a chunk is reported once durable: its folder is in place
        assert len(staging.chunk_dirs()) == chunks

    with ChunkFlusher(staging.writer(0, 1), 4, on_chunk) as flusher:
        for lo in range(0, 10, 2):
            flusher.add(_batch([lo, lo + 1]))
        flusher.finish(BatchAccumulatorStub())
    staging.mark_shard_done(0, 1, 10)
    assert [(c, w) for c, w, _ in reported] == [(1, 4), (2, 8), (3, 10)]
    assert {t for _, _, t in reported} == {threading.get_ident()}
    windows = list(staging.windows(10))
    assert np.array_equal(windows[0].raw, _raw(list(range(10))))


def test_a_failed_chunk_write_is_raised_to_the_build(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging")
    staging.init({"layout": {"dim": DIM}})
    writer = staging.writer(0, 1)
    shutil.rmtree(staging.chunks_dir)
    staging.chunks_dir.write_text("not a folder")  # where the chunk's folder must go
    reported: list[int] = []
    with ChunkFlusher(writer, 2, lambda chunks, _: reported.append(chunks)) as flusher:
        flusher.add(_batch([0, 1]))  # its write starts, and fails, in the background
        with pytest.raises(OSError):
            flusher.finish(BatchAccumulatorStub())
    assert reported == []


def test_leaving_on_an_error_lets_the_chunk_in_flight_land(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging")
    staging.init({"layout": {"dim": DIM}})
    with pytest.raises(RuntimeError, match="the task failed"), \
            ChunkFlusher(staging.writer(0, 1), 2, lambda *_: None) as flusher:
        flusher.add(_batch([0, 1]))
        raise RuntimeError("the task failed")
    assert len(staging.chunk_dirs()) == 1  # durable progress a resumed build keeps


class BatchAccumulatorStub(BatchAccumulator):
    """Nothing queued: :meth:`ChunkFlusher.finish` only writes what it holds."""

    def __init__(self) -> None:
        self.pending = []
