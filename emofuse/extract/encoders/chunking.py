"""Long inputs: cut into overlapping windows, encode each, stitch the outputs back into one sequence.

Every output position is taken from the window in which it is most central (the cut between two
neighbouring windows is the middle of their overlap), so each position sees as much context on
both sides as the windows allow. Nothing is ever dropped: the stitched output has exactly the
length that one forward over the whole input would give.
"""

from __future__ import annotations

import numpy as np


def chunk_spans(n: int, window: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, end) windows covering range(n): `window` long, neighbours share >= `overlap`.

    Starts are multiples of `align` (the hop of a strided conv front end, so that a window's output
    frames line up with the frames of the whole input). The last window ends at n; it may share
    more than `overlap` with its neighbour, and be up to align - 1 longer than `window`.
    """
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window), got overlap={overlap} window={window}")
    if window % align or overlap % align:
        raise ValueError(f"window ({window}) and overlap ({overlap}) must be multiples of {align}")
    if n <= window:
        return [(0, n)]
    step = window - overlap
    starts = list(range(0, n - window, step))  # windows that end before n
    last = (n - window) // align * align
    if last > starts[-1]:
        starts.append(last)
    return [(s, s + window) for s in starts[:-1]] + [(starts[-1], n)]


def stitch(pieces: list[np.ndarray], starts: list[int], total: int) -> np.ndarray:
    """One (total, ...) array from pieces[k] covering rows [starts[k], starts[k] + len(pieces[k]))."""
    if len(pieces) == 1:
        assert starts[0] == 0 and len(pieces[0]) == total, (starts, len(pieces[0]), total)
        return pieces[0]
    ends = [s + len(p) for s, p in zip(starts, pieces)]
    assert starts[0] == 0 and ends[-1] == total, (starts, ends, total)
    out = np.empty((total,) + pieces[0].shape[1:], dtype=pieces[0].dtype)
    for k, (piece, s) in enumerate(zip(pieces, starts)):
        lo = 0 if k == 0 else (s + ends[k - 1]) // 2  # middle of the overlap with the previous window
        hi = total if k == len(pieces) - 1 else (starts[k + 1] + ends[k]) // 2
        out[lo:hi] = piece[lo - s : hi - s]
    return out


def conv_output_length(n: int, kernels, strides) -> int:
    """Frames out of a stack of unpadded 1-d convolutions (the wav2vec2 feature encoder) for n samples."""
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1 if n >= k else 0
    return n
