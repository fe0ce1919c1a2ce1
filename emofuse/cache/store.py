"""A feature store: a folder of shards plus store.json. The only contract between extract and fuse.

    <cache>/<corpus>/<modality>-<backend>-<fingerprint[:8]>/
        store.json          format version, modality, encoder spec + fingerprint, dim, layers, fps, ...
        shard-<writer>-<seq>.h5
        failures.jsonl      utterances that could not be encoded: id, stage, reason
        store.lock          advisory lock held by the one writer on this machine

Opening a store reads the ids of every shard into an index. An id in two shards, a shard
with a foreign fingerprint or a truncated file is an error that names the file.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from emofuse import __version__
from emofuse.cache.shard import FORMAT_VERSION, Shard, ShardError, write_shard
from emofuse.errors import UserError

SHARD_RE = re.compile(r"^shard-(?P<writer>[A-Za-z0-9_.]+)-(?P<seq>\d+)\.h5$")


class CacheError(UserError):
    pass


def spec_differences(a: dict, b: dict, names: tuple[str, str] | None = None) -> list[str]:
    """Human-readable list of the settings in which two encoder specs differ: "layer: 6 vs 12", or
    with names ("config", "store"): "layer: config 6, store 12"."""
    keys = sorted(set(a) | set(b))
    if names is None:
        return [f"{k}: {_shown(a, k)} vs {_shown(b, k)}" for k in keys if a.get(k) != b.get(k)]
    return [f"{k}: {names[0]} {_shown(a, k)}, {names[1]} {_shown(b, k)}" for k in keys if a.get(k) != b.get(k)]


def _shown(spec: dict, key: str) -> str:
    """A setting's value for a message: sha256 digests cut to 12 characters (enough to tell two apart)."""
    if key not in spec:
        return "(not set)"
    value = spec[key]
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(value, k)}" for k in value) + "}"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    return repr(value)


class FeatureStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        meta_path = self.path / "store.json"
        if not meta_path.exists():
            raise CacheError(f"{self.path}: not a feature store (no store.json)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{meta_path}: unreadable store.json ({e})") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{meta_path}: format version {self.meta.get('format_version')}, expected {FORMAT_VERSION}")
        self.shards: list[Shard] = []
        self.index: dict[str, tuple[int, int]] = {}  # id -> (shard number, position in shard)
        self._open_shards()

    # --- properties from store.json -------------------------------------------------------
    @property
    def modality(self) -> str:
        return self.meta["modality"]

    @property
    def spec(self) -> dict:
        return self.meta["encoder"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def dim(self) -> int:
        return self.meta["dim"]

    @property
    def layers(self) -> int:
        return self.meta.get("layers", 1)

    # --- creating and opening ---------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, modality: str, spec: dict, fingerprint: str, dim: int, layers: int = 1,
               fps: float | None = None) -> "FeatureStore":
        """Open the store at `path` for writing, creating it if new. A store made with another
        encoder spec is never reused: that is an error naming both fingerprints and what differs."""
        path = Path(path)
        meta_path = path / "store.json"
        if meta_path.exists():
            existing = cls(path)
            if existing.fingerprint != fingerprint:
                diff = "; ".join(spec_differences(existing.spec, spec)) or "spec differs"
                raise CacheError(f"{path}: store was made with encoder fingerprint {existing.fingerprint[:12]}, "
                                 f"this run has {fingerprint[:12]} ({diff})")
            return existing
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "modality": modality,
            "encoder": spec,
            "fingerprint": fingerprint,
            "dim": int(dim),
            "layers": int(layers),
            "fps": fps,
            "emofuse_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_path)
        return cls(path)

    def _open_shards(self) -> None:
        try:
            for p in sorted(self.path.glob("*.h5")):
                if not SHARD_RE.match(p.name):
                    continue
                try:
                    shard = Shard(p)
                except ShardError as e:
                    raise CacheError(str(e)) from None
                self.shards.append(shard)  # before the checks: closed with the others if one fails
                if shard.fingerprint != self.fingerprint:
                    raise CacheError(f"{p}: shard fingerprint {shard.fingerprint[:12]} is not the store's "
                                     f"{self.fingerprint[:12]}")
                k = len(self.shards) - 1
                for i, uid in enumerate(shard.ids):
                    if uid in self.index:
                        other = self.shards[self.index[uid][0]].path.name
                        raise CacheError(f"{p}: id {uid!r} is also in {other}")
                    self.index[uid] = (k, i)
        except CacheError:
            # HDF5 keeps a file that is still open in this process and hands its cached state to the
            # next open of the same path: a refused store must not leave any shard open.
            self.close()
            raise

    def close(self) -> None:
        for s in self.shards:
            s.close()

    # --- reading ----------------------------------------------------------------------------
    def __contains__(self, uid: str) -> bool:
        return uid in self.index

    def __len__(self) -> int:
        return len(self.index)

    def ids(self) -> list[str]:
        return list(self.index)

    def get(self, uid: str) -> np.ndarray:
        k, i = self.index[uid]
        return self.shards[k].read(i)

    def length(self, uid: str) -> int:
        """Frames of one utterance, from the offsets alone (no feature read)."""
        k, i = self.index[uid]
        off = self.shards[k].offsets
        return int(off[i + 1] - off[i])

    def nbytes(self) -> int:
        """Bytes of all features when loaded as float16."""
        return sum(int(s.features.size) * 2 for s in self.shards)

    def load_all(self) -> dict[str, np.ndarray]:
        """Every utterance in memory, read shard by shard (one sequential read each)."""
        out = {}
        for shard in self.shards:
            try:
                feats = shard.read_all()
            except ShardError as e:
                raise CacheError(f"{e}; `emofuse cache verify {self.path}` lists every problem") from None
            for i, uid in enumerate(shard.ids):
                out[uid] = feats[shard.offsets[i] : shard.offsets[i + 1]]
        return out

    def failures(self) -> dict[str, dict]:
        path = self.path / "failures.jsonl"
        out = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash: ignore it, that id is redone
                    continue
                out[rec["id"]] = rec
        return out

    # --- summaries --------------------------------------------------------------------------
    def info(self) -> dict:
        frames = sum(int(s.offsets[-1]) for s in self.shards)
        nbytes = sum(p.stat().st_size for p in self.path.glob("shard-*.h5"))
        reasons: dict[str, int] = {}
        for rec in self.failures().values():
            key = f"{rec['stage']}: {rec['reason']}"
            reasons[key] = reasons.get(key, 0) + 1
        return {
            "path": str(self.path),
            "modality": self.modality,
            "encoder": self.spec,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "layers": self.layers,
            "fps": self.meta.get("fps"),
            "shards": len(self.shards),
            "utterances": len(self),
            "frames": frames,
            "bytes": nbytes,
            "failures": sum(reasons.values()),
            "failure_reasons": reasons,
        }

    @staticmethod
    def verify(path: Path) -> list[str]:
        """Check every shard of the store at `path`; return the problems found (empty = clean)."""
        path = Path(path)
        try:
            meta = json.loads((path / "store.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            return [f"{path / 'store.json'}: unreadable ({e})"]
        problems = []
        seen: dict[str, str] = {}
        for p in sorted(path.glob("*.h5")):
            if not SHARD_RE.match(p.name):
                problems.append(f"{p}: not a shard name this store writes")
                continue
            try:
                shard = Shard(p)
            except ShardError as e:
                problems.append(str(e))
                continue
            problems += shard.problems(meta["fingerprint"])
            for uid in shard.ids:
                if uid in seen and seen[uid] != p.name:
                    problems.append(f"{p}: id {uid!r} is also in {seen[uid]}")
                seen[uid] = p.name
            shard.close()
        for p in sorted(path.glob("*.tmp")):
            problems.append(f"{p}: leftover temporary file from an interrupted write (removed by the next extract)")
        return problems

    # --- writing ----------------------------------------------------------------------------
    def writer(self, writer_name: str = "local", max_shard_bytes: int = 64 << 20) -> "ShardWriter":
        return ShardWriter(self, writer_name, max_shard_bytes)


class ShardWriter:
    """Buffers encoded utterances and writes them as whole shards. Use as a context manager:
    it takes the store's lock, removes stale `.tmp` files, and writes the last shard on exit.

    A full shard is written by a background thread while the next one fills, one shard at a time
    (so at most two shards of features are held): building, checksumming and fsyncing a 64 MB
    shard otherwise stops the encoding loop (~0.65 s on this project's 2-core VM, ~4 ms per clip
    of wav2vec2-base features). Measured end to end on an H200 over 200 clips (two shards), the
    gain was within noise (bench/README.md, "GPU profile"). An error of a background write is
    raised by the next add, flush or the exit, and nothing more is written."""

    BACKGROUND = True  # False: every shard written in the caller's thread (bench A/B)

    def __init__(self, store: FeatureStore, writer_name: str, max_shard_bytes: int):
        self.store = store
        self.writer_name = writer_name
        self.max_shard_bytes = max_shard_bytes
        self.ids: list[str] = []
        self.arrays: list[np.ndarray] = []
        self.nbytes = 0
        self.lock_file = None
        self.shards_written = 0
        self._pool = None  # the background writer thread, started with the first full shard
        self._in_flight = None  # the Future of the shard it is writing
        self.failed = False  # a shard could not be written: nothing more is (the error was raised)

    def __enter__(self) -> "ShardWriter":
        self._lock()
        for tmp in self.store.path.glob(f"shard-{self.writer_name}-*.h5.tmp"):
            tmp.unlink()  # left by a crash; its utterances are not in the index and get redone
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On KeyboardInterrupt or an error in one stage we still keep what is finished.
        try:
            if exc_type is None or issubclass(exc_type, (KeyboardInterrupt, Exception)):
                self.flush()
            else:
                self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
            self._unlock()

    def _lock(self) -> None:
        # flock is released by the kernel when the holder dies, so a lock file left by a killed
        # process is stale by construction and simply taken over.
        path = self.store.path / "store.lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise CacheError(f"{self.store.path}: store is locked by PID {holder} (another extract is writing it)") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self.lock_file = f

    def _unlock(self) -> None:
        if self.lock_file is not None:
            fcntl.flock(self.lock_file.fileno(), fcntl.LOCK_UN)
            self.lock_file.close()
            self.lock_file = None

    def _next_path(self) -> Path:
        seqs = [int(m["seq"]) for p in self.store.path.glob(f"shard-{self.writer_name}-*.h5")
                if (m := SHARD_RE.match(p.name))]
        return self.store.path / f"shard-{self.writer_name}-{max(seqs, default=-1) + 1:05d}.h5"

    def add(self, uid: str, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float16)
        if not np.isfinite(features).all():
            raise ValueError(f"{uid}: features contain NaN or Inf (or overflow float16)")
        self._wait_if_failed()
        self.ids.append(uid)
        self.arrays.append(features)
        self.nbytes += features.nbytes
        if self.nbytes >= self.max_shard_bytes:
            if self.BACKGROUND:
                self._wait()  # the shard before is published: one in flight at a time
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
                self._in_flight = self._pool.submit(self._write, *self._take())
            else:
                self.flush()

    def add_failure(self, uid: str, stage: str, reason: str) -> None:
        try:
            with open(self.store.path / "failures.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"id": uid, "stage": stage, "reason": reason}, ensure_ascii=False) + "\n")
        except OSError as e:
            raise CacheError(f"{self.store.path / 'failures.jsonl'}: could not write ({e.strerror or e})") from None

    def flush(self) -> None:
        """Write what is buffered; when it returns every shard added so far is published."""
        self._wait()
        if self.ids and not self.failed:
            self._write(*self._take())

    def _take(self) -> tuple[Path, list[str], list[np.ndarray]]:
        """The next shard's path and the buffer, which starts empty again (after a failed write
        too: nothing is retried on exit)."""
        path, ids, arrays = self._next_path(), self.ids, self.arrays
        self.ids, self.arrays, self.nbytes = [], [], 0
        return path, ids, arrays

    def _write(self, path: Path, ids: list[str], arrays: list[np.ndarray]) -> None:
        try:
            write_shard(path, ids, arrays, self.store.fingerprint)
        except OSError as e:  # disk full, file-size limit, permissions: keep what is finished, say so
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)
            self.failed = True
            raise CacheError(f"{path}: could not write shard ({e.strerror or e}); the {self.shards_written} "
                             f"shard(s) written before stay valid, run again to resume") from None
        self.shards_written += 1

    def _wait(self) -> None:
        """Until the background write (if any) is done; its error, if it had one, is raised here."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def _wait_if_failed(self) -> None:
        if self._in_flight is not None and self._in_flight.done():
            self._wait()
