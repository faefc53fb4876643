"""Staged windows read back across chunks and shards, by positioned reads of the chunks' files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
