import errno
import json

import h5py
import numpy as np
import pytest

from emofuse.cache.shard import Shard, write_shard
from emofuse.cache import store as store_module
from emofuse.cache.store import CacheError, FeatureStore, ShardWriter
from emofuse.extract.encoders.base import fingerprint

SPEC = {"backend": "toy", "dim": 8, "dtype": "float32"}
FP = fingerprint(SPEC)


def _arrays(n, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(1, 20)), dim)).astype(np.float32) for _ in range(n)]


def _store(tmp_path, n=10, shard_mb=1):
    store = FeatureStore.create(tmp_path / "audio-toy", "audio", SPEC, FP, dim=8)
    arrays = _arrays(n)
    with store.writer(max_shard_bytes=shard_mb) as w:
        for i, a in enumerate(arrays):
            w.add(f"u{i}", a)
    return FeatureStore(store.path), arrays


def test_shard_roundtrip_layout(tmp_path):
    arrays = _arrays(5)
    path = tmp_path / "shard-local-00000.h5"
    write_shard(path, [f"u{i}" for i in range(5)], arrays, FP)
    assert not list(tmp_path.glob("*.tmp"))
    with h5py.File(path) as f:
        assert f["features"].dtype == np.float16
        assert f["features"].shape == (sum(len(a) for a in arrays), 8)
        assert list(f["offsets"][:]) == [0, *np.cumsum([len(a) for a in arrays])]
        assert f.attrs["fingerprint"] == FP
    shard = Shard(path)
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(shard.read(i), a.astype(np.float16))
    assert shard.problems(FP) == []


def test_store_write_read_and_resume_index(tmp_path):
    store, arrays = _store(tmp_path, n=10, shard_mb=200)  # ~200 bytes per shard -> many shards
    assert len(store.shards) > 1
    assert len(store) == 10
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(store.get(f"u{i}"), a.astype(np.float16))
    loaded = store.load_all()
    assert set(loaded) == {f"u{i}" for i in range(10)}
    info = store.info()
    assert info["utterances"] == 10 and info["frames"] == sum(len(a) for a in arrays)
    assert FeatureStore.verify(store.path) == []


def test_background_writes_give_the_shards_of_foreground_writes(tmp_path, monkeypatch):
    """Full shards are written by a background thread while the next one fills: the same shards,
    byte for byte, as when every shard is written in the caller's thread, all published on exit."""
    shards = {}
    for background in (True, False):
        monkeypatch.setattr(ShardWriter, "BACKGROUND", background)
        store, _ = _store(tmp_path / str(background), n=40, shard_mb=300)
        shards[background] = sorted(store.path.glob("shard-*"))
    assert len(shards[True]) > 3
    assert [p.name for p in shards[True]] == [p.name for p in shards[False]]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(shards[True], shards[False]))


def test_a_failed_background_write_stops_the_writer(tmp_path, monkeypatch):
    """A shard that fails in the background is raised as one CacheError by the writer (a later add,
    or its exit), and nothing after it is written: the shards before stay valid, as in the
    foreground."""
    calls = []
    real = store_module.write_shard

    def second_fails(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args)

    monkeypatch.setattr(store_module, "write_shard", second_fails)
    store = FeatureStore.create(tmp_path / "audio-toy", "audio", SPEC, FP, dim=8)
    with pytest.raises(CacheError, match=r"No space left on device\); the 1 shard\(s\) written before stay valid"):
        with store.writer(max_shard_bytes=300) as w:
            for i, a in enumerate(_arrays(40)):
                w.add(f"u{i}", a)
    assert len(calls) == 2
    reopened = FeatureStore(store.path)
    assert len(reopened.shards) == 1 and not list(store.path.glob("*.tmp"))
    assert FeatureStore.verify(store.path) == []


def test_store_refuses_other_spec(tmp_path):
    store, _ = _store(tmp_path)
    other = dict(SPEC, dtype="bfloat16")
    with pytest.raises(CacheError, match="dtype: 'float32' vs 'bfloat16'"):
        FeatureStore.create(store.path, "audio", other, fingerprint(other), dim=8)


def test_lock_refuses_second_writer(tmp_path):
    store, _ = _store(tmp_path)
    with store.writer():
        with pytest.raises(CacheError, match="locked by PID"):
            with store.writer():
                pass
    with store.writer():  # released again
        pass


def test_failures_and_nan_rejected(tmp_path):
    store = FeatureStore.create(tmp_path / "s", "audio", SPEC, FP, dim=8)
    with store.writer() as w:
        w.add_failure("bad", "decode", "empty file")
        with pytest.raises(ValueError):
            w.add("nan", np.full((3, 8), np.nan, dtype=np.float32))
    assert FeatureStore(store.path).failures()["bad"]["reason"] == "empty file"


def test_verify_catches_corruption(tmp_path):
    store, _ = _store(tmp_path, n=6, shard_mb=300)
    shards = sorted(store.path.glob("shard-*.h5"))
    store.close()
    # NaN written into one shard's features
    with h5py.File(shards[0], "r+") as f:
        f["features"][0, 0] = np.nan
    # a truncated shard
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    problems = FeatureStore.verify(store.path)
    assert any(str(shards[0]) in p and "NaN" in p for p in problems)
    assert any(str(shards[1]) in p for p in problems)
    with pytest.raises(CacheError, match=shards[1].name):
        FeatureStore(store.path)


def test_duplicate_id_across_shards_is_an_error(tmp_path):
    store, arrays = _store(tmp_path, n=3, shard_mb=1 << 30)
    write_shard(store.path / "shard-other-00000.h5", ["u1"], [arrays[1]], FP)
    assert any("also in" in p for p in FeatureStore.verify(store.path))
    with pytest.raises(CacheError, match="also in"):
        FeatureStore(store.path)


def test_leftover_tmp_removed_by_writer(tmp_path):
    store, _ = _store(tmp_path, n=3)
    tmp = store.path / "shard-local-00009.h5.tmp"
    tmp.write_bytes(b"half a shard")
    assert any(".tmp" in p for p in FeatureStore.verify(store.path))
    with store.writer():
        pass
    assert not tmp.exists()
    assert FeatureStore.verify(store.path) == []
    assert json.loads((store.path / "store.json").read_text())["fingerprint"] == FP


def test_every_flipped_byte_is_caught_or_harmless(tmp_path):
    """Flip each byte of a shard in turn. HDF5 keeps no checksums (flips in the features read back
    as other numbers; flips in its metadata crashed or hung the library), so shards carry CRCs: each
    flip must be reported by verify AND refused by opening/loading the store, or change nothing."""
    import h5py

    store, _ = _store(tmp_path, n=4, shard_mb=1 << 30)  # one shard
    expected = store.load_all()
    shard = store.shards[0].path
    store.close()
    original = shard.read_bytes()
    shard.unlink()
    files_open = h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)
    caught = harmless = 0
    for pos in range(len(original)):
        for old in store.path.glob("shard-*.h5"):
            old.unlink()
        damaged = bytearray(original)
        damaged[pos] ^= 0xFF
        (store.path / f"shard-local-{pos:05d}.h5").write_bytes(damaged)  # a new file: no cached HDF5 state
        problems = FeatureStore.verify(store.path)
        opened = None
        try:
            opened = FeatureStore(store.path)
            loaded = opened.load_all()
        except CacheError:
            loaded = None
        finally:
            if opened is not None:
                opened.close()
        assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) == files_open  # nothing left open
        if loaded is None:
            assert problems, pos  # refused on opening: verify says why too
            caught += 1
        else:
            assert not problems, (pos, problems)  # verify and opening agree
            assert loaded.keys() == expected.keys() and all(np.array_equal(loaded[k], expected[k]) for k in loaded), pos
            harmless += 1
    assert harmless <= 8, harmless  # the trailer's magic: without it the shard reads as a legacy one, intact
    assert caught + harmless == len(original)
