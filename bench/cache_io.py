"""Cache I/O: random utterance reads from a multi-GB feature store, cold and warm, against a raw read.

Writes ~2 GB of float16 features (D = 512, wav2vec-like frame counts, ~7 s at 50 frames/s per
utterance) through emofuse.cache (FeatureStore + ShardWriter, 64 MB shards) into a temporary
folder, then measures, side by side in one run:

  - random reads: every utterance once, in random order, through FeatureStore.get (an h5py slice
    of the contiguous `features` array), as utterances/s and MB/s;
  - raw sequential read: the same shard files read front to back with os.read in 16 MB blocks;
each cold (page cache dropped first: /proc/sys/vm/drop_caches when permitted, else
posix_fadvise(DONTNEED) on every shard; the resident fraction is checked with mincore) and warm
(everything already in the page cache). The ratio random / raw is printed.

Also (unless --no-chunked): the layout emofuse did not choose, one chunked HDF5 dataset per
utterance, on the same utterances, compared with the contiguous layout read the same way.
The temporary folder is deleted at the end.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "cache_io"
DIM = 512


def frame_counts(n: int, rng) -> "np.ndarray":
    """wav2vec-like frame counts: ~7 s median utterances at 50 frames/s (lognormal, 1-30 s)."""
    import numpy as np

    seconds = np.clip(rng.lognormal(np.log(6.3), 0.55, n), 1.0, 30.0)
    return np.maximum(1, (seconds * 50).astype(int))


def write_store(path: Path, target_bytes: int, seed: int = 0) -> tuple[object, list[str]]:
    """A store of random float16 features, ~target_bytes of features, written through ShardWriter."""
    import numpy as np

    from emofuse.cache.store import FeatureStore
    from emofuse.extract.encoders.base import fingerprint

    rng = np.random.default_rng(seed)
    mean_frames = 380
    n = max(8, int(target_bytes / (mean_frames * DIM * 2)))
    lengths = frame_counts(n, rng)
    # A pool of random values, sliced at random offsets: fast, and no two utterances alike.
    pool = rng.standard_normal((int(lengths.max()) + 4096, DIM)).astype(np.float16)
    spec = {"backend": "bench-random", "dim": DIM, "seed": seed}
    store = FeatureStore.create(path, "audio", spec, fingerprint(spec), dim=DIM, fps=50.0)
    ids = [f"utt{i:06d}" for i in range(n)]
    with store.writer("bench", 64 << 20) as w:
        for uid, t in zip(ids, lengths):
            a = int(rng.integers(0, len(pool) - t))
            w.add(uid, pool[a : a + t])
    store.close()
    return FeatureStore(path), ids


def shard_files(store) -> list[Path]:
    return [s.path for s in store.shards]


def evict(paths) -> tuple[str, float | None]:
    method = common.drop_file_cache(paths)
    return method, common.cached_fraction(paths)


def warm(paths) -> float | None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass
    return common.cached_fraction(paths)


def raw_read(paths) -> tuple[float, int]:
    total = 0
    start = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            while True:
                b = os.read(fd, 16 << 20)
                if not b:
                    break
                total += len(b)
        finally:
            os.close(fd)
    return time.perf_counter() - start, total


def random_reads(get, ids: list[str], seed: int) -> tuple[float, int]:
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(ids))
    nbytes = 0
    start = time.perf_counter()
    for k in order:
        nbytes += get(ids[k]).nbytes
    return time.perf_counter() - start, nbytes


def write_chunked(path: Path, store, ids: list[str]) -> None:
    """The alternative layout: one chunked dataset per utterance (h5py's auto chunking)."""
    import h5py

    with h5py.File(path, "w") as f:
        for uid in ids:
            f.create_dataset(uid, data=store.get(uid), chunks=True)


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--gb", type=float, default=2.0, help="feature bytes to write (full run)")
    p.add_argument("--no-chunked", action="store_true", help="skip the chunked per-utterance layout")
    p.add_argument("--chunked-utts", type=int, default=1500, help="utterances in the layout comparison")
    args = p.parse_args(argv)
    import h5py

    gb = 0.15 if args.quick else args.gb
    rows, layout_rows = [], []
    with common.temp_dir(args.tmp, NAME) as tmp:
        common.log(f"[cache_io] writing {gb:g} GB of float16 features through FeatureStore/ShardWriter")
        t0 = time.perf_counter()
        store, ids = write_store(tmp / "audio-bench", int(gb * (1 << 30)))
        write_s = time.perf_counter() - t0
        files = shard_files(store)
        on_disk = sum(f.stat().st_size for f in files)
        feat_bytes = store.nbytes()
        common.log(f"[cache_io] {len(ids)} utterances, {len(files)} shards, {on_disk / 1e9:.2f} GB on disk, "
                   f"written in {write_s:.1f} s")

        results = {}
        for state in ("cold", "warm"):
            for what in ("raw sequential read", "random utterance reads"):
                if state == "cold":
                    method, resident = evict(files)
                else:
                    resident = warm(files)
                if what.startswith("raw"):
                    seconds, nbytes = raw_read(files)
                    n = None
                else:
                    store.close()
                    store = type(store)(store.path)  # reopen: nothing of the features kept in h5py
                    seconds, nbytes = random_reads(store.get, ids, seed=1 if state == "cold" else 2)
                    n = len(ids)
                results[(state, what)] = {"state": state, "what": what, "seconds": seconds, "bytes": nbytes,
                                          "mb_per_s": nbytes / 1e6 / seconds,
                                          "utterances_per_s": n / seconds if n else None,
                                          "resident_before": resident}
                common.log(f"[cache_io]   {state} {what}: {nbytes / 1e6 / seconds:,.0f} MB/s"
                           + (f", {n / seconds:,.0f} utt/s" if n else "") + f" (resident before: {resident})")
        for state in ("cold", "warm"):
            raw = results[(state, "raw sequential read")]
            rnd = results[(state, "random utterance reads")]
            rnd["ratio_to_raw"] = rnd["mb_per_s"] / raw["mb_per_s"]
            raw["ratio_to_raw"] = 1.0
            rows += [raw, rnd]

        if not args.no_chunked:
            m = min(len(ids), 200 if args.quick else args.chunked_utts)
            subset = ids[:: max(1, len(ids) // m)][:m]
            common.log(f"[cache_io] layout comparison on {len(subset)} utterances")
            chunked_path = tmp / "chunked.h5"
            write_chunked(chunked_path, store, subset)
            contiguous_files = sorted({store.shards[store.index[u][0]].path for u in subset})
            for state in ("cold", "warm"):
                for layout in ("contiguous + offsets (emofuse)", "chunked dataset per utterance"):
                    paths = contiguous_files if layout.startswith("contiguous") else [chunked_path]
                    resident = evict(paths)[1] if state == "cold" else warm(paths)
                    if layout.startswith("contiguous"):
                        store.close()
                        store = type(store)(store.path)
                        get = store.get
                        f = None
                    else:
                        f = h5py.File(chunked_path, "r")
                        get = lambda uid, f=f: f[uid][:]  # noqa: E731
                    seconds, nbytes = random_reads(get, subset, seed=3)
                    if f is not None:
                        f.close()
                    layout_rows.append({"layout": layout, "state": state, "utterances": len(subset),
                                        "utterances_per_s": len(subset) / seconds, "mb_per_s": nbytes / 1e6 / seconds,
                                        "resident_before": resident})
            for state in ("cold", "warm"):
                a, b = [r for r in layout_rows if r["state"] == state]
                a["speedup_vs_chunked"] = a["utterances_per_s"] / b["utterances_per_s"]
        store.close()

    data = {"quick": args.quick, "eviction": method, "utterances": len(ids), "shards": len(files),
            "feature_bytes": feat_bytes, "bytes_on_disk": on_disk, "write_seconds": write_s,
            "write_mb_per_s": on_disk / 1e6 / write_s, "dim": DIM, "dtype": "float16",
            "mean_frames": feat_bytes / len(ids) / DIM / 2, "rows": rows, "layout": layout_rows}
    path = common.write_result(NAME, data, args.out)

    title = (f"Cache I/O: {len(ids):,} utterances, {on_disk / 1e9:.2f} GB in {len(files)} shards "
             f"(cold = {method.split(' ')[0]}){' [QUICK: not a measurement]' if args.quick else ''}")
    t = [[r["state"], r["what"], r["utterances_per_s"], r["mb_per_s"], f"{r['ratio_to_raw']:.2f}x",
          None if r["resident_before"] is None else f"{100 * r['resident_before']:.0f}%"] for r in rows]
    print(common.table(t, ["cache", "read", "utt/s", "MB/s", "vs raw", "resident before"], title))
    if layout_rows:
        t = [[r["state"], r["layout"], r["utterances"], r["utterances_per_s"], r["mb_per_s"],
              f"{r['speedup_vs_chunked']:.2f}x" if "speedup_vs_chunked" in r else "1.00x"] for r in layout_rows]
        print(common.table(t, ["cache", "layout", "utts", "utt/s", "MB/s", "vs chunked"], "Layout comparison"))
    print(f"write: {data['write_mb_per_s']:,.0f} MB/s through ShardWriter; wrote {path}")
    return data


if __name__ == "__main__":
    main()
