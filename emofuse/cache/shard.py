"""One HDF5 shard: written whole, read many times.

Layout (cache format version 1):
    features  float16 (total_frames, D) or (total_frames, L, D): utterances end to end
    offsets   int64 (n + 1,): utterance i is features[offsets[i]:offsets[i + 1]]
    ids       utf-8 strings (n,)
    attrs     fingerprint, format_version
followed by a 32-byte trailer after the HDF5 image (HDF5 ignores bytes past its end):
    b"EMOFUSE1", features' byte offset and length in the file (uint64 each), CRC-32 of every
    other byte of the image, CRC-32 of the features' bytes

Contiguous features + offsets read 2-3x faster than one chunked dataset per utterance.
A shard is written to `<name>.h5.tmp`, flushed and fsynced, then renamed: a reader never
sees half a shard, and a crash leaves at most a `.tmp` that the store removes.

Why the trailer: HDF5 keeps no checksum of its metadata or data. Flipped bytes in the features
read back as other numbers, and in the metadata they crashed (segfault) or hung the HDF5 library.
So opening a shard first checks the CRC of everything but the features (a few KB: metadata, ids,
offsets) before HDF5 reads a byte; the features' CRC is checked by `cache verify` and whenever a
run loads a shard whole. Shards written before the trailer existed are opened unchecked.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 1
TRAILER = struct.Struct("<8sQQII")  # magic, features offset, features length, other bytes' CRC, features' CRC
MAGIC = b"EMOFUSE1"


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
        start = f["features"].id.get_offset()  # None when there are no frames
        length = f["features"].id.get_storage_size()
    start = len(image) if start is None else start
    view = memoryview(image)  # slices without copies
    trailer = TRAILER.pack(MAGIC, start, length, zlib.crc32(view[start + length :], zlib.crc32(view[:start])),
                           zlib.crc32(view[start : start + length]))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(image)
        fh.write(trailer)
        fh.flush()
        os.fsync(fh.fileno())  # durable before the rename publishes it
    os.replace(tmp, path)


class Shard:
    """Read access to one complete shard. Opening reads ids and offsets, not features."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.features_span, self.features_crc = check_trailer(self.path)  # before HDF5 reads anything
        self.file = None
        try:
            self.file = h5py.File(self.path, "r")
            self.fingerprint = str(self.file.attrs["fingerprint"])
            self.format_version = int(self.file.attrs["format_version"])
            self.ids = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in self.file["ids"][:]]
            self.offsets = np.asarray(self.file["offsets"][:], dtype=np.int64)
            self.features = self.file["features"]
            if not isinstance(self.features, h5py.Dataset) or self.features.ndim not in (2, 3):
                raise ValueError("'features' is not a 2-d or 3-d dataset")
        # A damaged legacy shard (no trailer) can make h5py fail in many ways: each means the same here.
        except Exception as e:
            if self.file is not None:
                self.file.close()
            raise ShardError(f"{self.path}: unreadable or truncated shard ({type(e).__name__}: {e})") from None

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, i: int) -> np.ndarray:
        return self.features[self.offsets[i] : self.offsets[i + 1]]

    def read_all(self) -> np.ndarray:
        """All features, checked against the shard's checksum (corruption raises ShardError)."""
        try:
            x = self.features[:]
        except Exception as e:  # damaged data pages of a legacy shard; see __init__
            raise ShardError(f"{self.path}: features unreadable ({type(e).__name__}: {e})") from None
        if self.features_crc is not None and zlib.crc32(np.ascontiguousarray(x)) != self.features_crc:
            raise ShardError(f"{self.path}: features do not match their checksum (corrupted bytes)")
        return x

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
            if self.features_crc is not None and features_crc(self.path, *self.features_span) != self.features_crc:
                out.append(f"{name}: features do not match their checksum (corrupted bytes)")
            try:
                step = 1 << 16  # scan in blocks: bounded memory for multi-GB shards
                for a in range(0, n_frames, step):
                    block = self.features[a : a + step]
                    if not np.isfinite(block).all():
                        out.append(f"{name}: NaN or Inf in features (first bad block starts at frame {a})")
                        break
            except Exception as e:  # truncated or corrupted data pages of a legacy shard; see __init__
                out.append(f"{name}: features unreadable ({type(e).__name__}: {e})")
        return out


def check_trailer(path: Path) -> tuple[tuple[int, int], int | None]:
    """The features' (offset, length) in the file and their CRC, after checking the CRC of every
    other byte; ((0, 0), None) for a legacy shard without a trailer. Raises ShardError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            fh.seek(max(0, size - TRAILER.size))
            magic, start, length, other_crc, feat_crc = TRAILER.unpack(fh.read(TRAILER.size).rjust(TRAILER.size, b"\0"))
            if magic != MAGIC:
                return (0, 0), None
            end = size - TRAILER.size
            if start + length > end:
                raise ShardError(f"{path}: shard trailer does not fit the file (truncated or corrupted)")
            fh.seek(0)
            crc = zlib.crc32(fh.read(start))  # metadata, ids and offsets: small
            fh.seek(start + length)
            crc = zlib.crc32(fh.read(end - start - length), crc)
    except OSError as e:
        raise ShardError(f"{path}: unreadable shard ({e.strerror or e})") from None
    if crc != other_crc:
        raise ShardError(f"{path}: shard metadata, ids or offsets do not match their checksum (corrupted bytes)")
    return (start, length), feat_crc


def features_crc(path: Path, start: int, length: int, block: int = 1 << 24) -> int:
    """CRC-32 of the features' bytes as they lie in the file, read in blocks (bounded memory)."""
    crc = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while length > 0:
            chunk = fh.read(min(block, length))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            length -= len(chunk)
    return crc
