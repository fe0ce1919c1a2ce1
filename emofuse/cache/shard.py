"""One HDF5 shard: written whole, read many times.

Layout (cache format version 1):
    features  float16 (total_frames, D) or (total_frames, L, D): utterances end to end
    offsets   int64 (n + 1,): utterance i is features[offsets[i]:offsets[i + 1]]
    ids       utf-8 strings (n,)
    attrs     fingerprint, format_version

Contiguous features + offsets read 2-3x faster than one chunked dataset per utterance.
A shard is written to `<name>.h5.tmp`, flushed and fsynced, then renamed: a reader never
sees half a shard, and a crash leaves at most a `.tmp` that the store removes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 1


class ShardError(Exception):
    """A shard that cannot be trusted; the message names the file."""


def write_shard(path: Path, ids: list[str], arrays: list[np.ndarray], fingerprint: str) -> None:
    assert len(ids) == len(arrays) and ids, "a shard holds at least one utterance"
    lengths = [len(a) for a in arrays]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    features = np.concatenate(arrays, axis=0).astype(np.float16, copy=False)

    # Build the HDF5 file in memory, then write its bytes with plain file I/O: a full disk or a
    # file-size limit then surfaces as one OSError, not as HDF5 errors at close time.
    with h5py.File(io.BytesIO(), "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.attrs["fingerprint"] = fingerprint
        f.attrs["format_version"] = FORMAT_VERSION
        f.flush()
        image = f.id.get_file_image()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(image)
        fh.flush()
        os.fsync(fh.fileno())  # durable before the rename publishes it
    os.replace(tmp, path)


class Shard:
    """Read access to one complete shard. Opening reads ids and offsets, not features."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r")
            self.fingerprint = str(self.file.attrs["fingerprint"])
            self.format_version = int(self.file.attrs["format_version"])
            self.ids = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in self.file["ids"][:]]
            self.offsets = self.file["offsets"][:]
            self.features = self.file["features"]
        except (OSError, KeyError, ValueError) as e:
            raise ShardError(f"{self.path}: unreadable or truncated shard ({e})") from None

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, i: int) -> np.ndarray:
        return self.features[self.offsets[i] : self.offsets[i + 1]]

    def read_all(self) -> np.ndarray:
        return self.features[:]

    def close(self) -> None:
        self.file.close()

    def problems(self, expected_fingerprint: str, scan_values: bool = True) -> list[str]:
        """Everything wrong with this shard, each message naming the file."""
        out = []
        name = str(self.path)
        if self.fingerprint != expected_fingerprint:
            out.append(f"{name}: fingerprint {self.fingerprint[:12]} does not match the store's {expected_fingerprint[:12]}")
        if self.format_version != FORMAT_VERSION:
            out.append(f"{name}: format version {self.format_version}, expected {FORMAT_VERSION}")
        off = self.offsets
        n_frames = self.features.shape[0]
        if len(off) != len(self.ids) + 1:
            out.append(f"{name}: {len(off)} offsets for {len(self.ids)} ids (expected n + 1)")
        elif off[0] != 0 or off[-1] != n_frames or np.any(np.diff(off) < 0):
            out.append(f"{name}: offsets are not 0 .. {n_frames} non-decreasing")
        if len(set(self.ids)) != len(self.ids):
            out.append(f"{name}: duplicate ids inside the shard")
        if scan_values:
            try:
                step = 1 << 16  # scan in blocks: bounded memory for multi-GB shards
                for a in range(0, n_frames, step):
                    block = self.features[a : a + step]
                    if not np.isfinite(block).all():
                        out.append(f"{name}: NaN or Inf in features (first bad block starts at frame {a})")
                        break
            except OSError as e:  # truncated or corrupted data pages
                out.append(f"{name}: features unreadable ({e})")
        return out
