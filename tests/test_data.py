"""The training-side view of the cache: preloaded and lazy reads agree; masks, missing modalities."""

import json

import numpy as np
import pytest

from emofuse.cache.store import FeatureStore
from emofuse.corpora.base import Protocol, Utterance, write_utterances
from emofuse.errors import UserError
from emofuse.extract.encoders.base import fingerprint
from emofuse.fuse.data import CachedData, Normalizer, collate, find_store, make_batches


@pytest.fixture()
def cache(tmp_path):
    rng = np.random.default_rng(0)
    utts = [Utterance(id=f"u{i}", split=["train", "dev", "test"][i % 3], labels={"emotion": ["a", "b"][i % 2]})
            for i in range(12)]
    write_utterances(utts, tmp_path / "utterances.jsonl")
    (tmp_path / "protocol.json").write_text(json.dumps(vars(Protocol("toy", "emotion", classes=["a", "b"]))))
    for m, dim in (("audio", 5), ("text", 3)):
        spec = {"backend": f"toy-{m}", "dim": dim}
        store = FeatureStore.create(tmp_path / f"{m}-toy", m, spec, fingerprint(spec), dim=dim)
        with store.writer() as w:
            for u in utts:
                if m == "text" and u.id == "u4":
                    w.add_failure(u.id, "text", "empty transcript")  # missing modality for u4
                    continue
                w.add(u.id, rng.standard_normal((int(rng.integers(2, 9)), dim)).astype(np.float32))
    encoders = {"audio": {"backend": "toy-audio"}, "text": {"backend": "toy-text"}}
    return tmp_path, encoders


def test_lazy_and_preloaded_give_the_same_batches(cache):
    path, encoders = cache
    eager = CachedData(path, encoders, ["audio", "text"], preload_gb=1.0)
    lazy = CachedData(path, encoders, ["audio", "text"], preload_gb=0.0)
    assert eager.preloaded and not lazy.preloaded
    ids = eager.split_ids("train")
    norm_e = Normalizer.fit(eager.features, ids)
    norm_l = Normalizer.fit(lazy.features, ids)
    np.testing.assert_allclose(norm_e.mean["audio"], norm_l.mean["audio"])
    assert eager.length("u1") == lazy.length("u1") == len(eager.features["audio"]["u1"]) + len(eager.features["text"]["u1"])
    batch = ["u1", "u4", "u7"]
    a = collate(batch, eager.features, eager.frame_shapes(), norm_e)
    b = collate(batch, lazy.features, lazy.frame_shapes(), norm_l)
    for m in ("audio", "text"):
        np.testing.assert_array_equal(a[0][m].numpy(), b[0][m].numpy())
        np.testing.assert_array_equal(a[1][m].numpy(), b[1][m].numpy())
    present = a[2].numpy()
    assert present[:, 0].all() and present[:, 1].tolist() == [True, False, True]  # u4 has no text
    assert not a[1]["text"][1].any()  # and no valid text frame
    assert a[1]["audio"][0].sum() == len(eager.features["audio"]["u1"])


def test_batches_cover_every_id_once(cache):
    path, encoders = cache
    data = CachedData(path, encoders, ["audio"])
    ids = [u.id for u in data.utterances]
    lengths = {i: data.length(i) for i in ids}
    for shuffle in (False, True):
        batches = make_batches(ids, lengths, 5, shuffle, np.random.default_rng(0))
        assert sorted(i for b in batches for i in b) == sorted(ids)
    first = make_batches(ids, lengths, 5, False)
    assert first == make_batches(ids, lengths, 5, False)  # evaluation order is fixed


# --- stale or foreign caches: refused, with both fingerprints and the settings that differ ---------

def test_store_of_other_settings_is_refused_naming_what_differs(tmp_path):
    from emofuse.extract.encoders.base import build_encoder

    made = build_encoder("text", {"backend": "minilm"}).full_spec()  # layer -1
    store = FeatureStore.create(tmp_path / "text-minilm-made", "text", made, fingerprint(made), dim=384)
    with store.writer() as w:
        w.add("u0", np.zeros((3, 384), np.float32))
    wanted = build_encoder("text", {"backend": "minilm", "layer": 3}).full_spec()
    with pytest.raises(UserError) as e:
        find_store(tmp_path, "text", {"backend": "minilm", "layer": 3})
    msg = str(e.value)
    assert "the closest, text-minilm-made (fingerprint " + fingerprint(made)[:12] + ")" in msg
    assert "differs in layer: config 3, store -1;" in msg
    assert "the config's settings give fingerprint " + fingerprint(wanted)[:12] in msg
    assert "\n" not in msg
    # Where and how an encoder runs is not a setting of its features: the store serves a CPU config.
    assert find_store(tmp_path, "text", {"backend": "minilm", "device": "cpu"}).path == store.path


def test_store_of_an_older_text_padding_is_stale(tmp_path):
    """Text stores made while text was padded to multiples of 16 (no "padding" in their spec) have
    another fingerprint: extraction never extends one (a store must not mix two policies, whose
    features differ in the last bits), it makes a new store beside it, which training then uses;
    a model trained on the old features is refused, naming the setting."""
    from emofuse.extract.encoders.base import build_encoder
    from emofuse.extract.pipeline import extract_modality, store_path
    from emofuse.fuse.evaluate import check_fingerprints

    enc = build_encoder("text", {"backend": "minilm"})
    new = enc.full_spec()
    assert new["padding"] == "exact"
    old = {k: v for k, v in new.items() if k != "padding"}
    old_store = FeatureStore.create(store_path(tmp_path, "text", old), "text", old, fingerprint(old), dim=384)
    with old_store.writer() as w:
        w.add("u0", np.zeros((3, 384), np.float32))
    utts = [Utterance(id=f"u{i}", text=t, split="train") for i, t in enumerate(["Hello there.", "So angry!"])]
    result = extract_modality(utts, enc, tmp_path, budget=512, progress=False, log=lambda *_: None)
    assert result.store != str(old_store.path) and result.encoded == 2 and result.skipped == 0
    assert len(FeatureStore(old_store.path)) == 1  # untouched
    # Both agree with what the config names ({backend: minilm}); the config's full spec picks the new one.
    assert str(find_store(tmp_path, "text", {"backend": "minilm"}).path) == result.store

    seed = tmp_path / "seed-0"
    seed.mkdir()
    (seed / "model.json").write_text(json.dumps({"fingerprints": {"text": fingerprint(old)}, "encoders": {"text": old}}))

    class Data:
        stores = {"text": FeatureStore(result.store)}

        def fingerprints(self):
            return {"text": self.stores["text"].fingerprint}

    with pytest.raises(UserError) as e:
        check_fingerprints(seed, Data())
    assert "(padding: model (not set), cache 'exact'); re-extract with the run's encoder settings, or train " \
           "the run again on this cache" in str(e.value)


def test_refusal_when_the_configs_encoder_cannot_be_built_here(tmp_path):
    spec = {"backend": "toy-audio", "dim": 5, "checkpoint_sha256": "a" * 64}
    for name, sha in (("audio-toy-1", "a" * 64), ("audio-toy-2", "b" * 64)):
        s = dict(spec, checkpoint_sha256=sha)
        FeatureStore.create(tmp_path / name, "audio", s, fingerprint(s), dim=5)
    with pytest.raises(UserError) as e:  # a toy backend: the config's fingerprint is not computable
        find_store(tmp_path, "audio", {"backend": "toy-audio", "dim": 6})
    msg = str(e.value)
    assert "differs in dim: config 6, store 5;" in msg and "unknown encoder backend 'toy-audio'" in msg
    with pytest.raises(UserError) as e:  # both match what the config names: which one is meant?
        find_store(tmp_path, "audio", {"backend": "toy-audio"})
    msg = str(e.value)
    assert "several audio stores" in msg and "differing in checkpoint_sha256" in msg
    assert fingerprint(dict(spec, checkpoint_sha256="b" * 64))[:12] in msg


def test_model_and_cache_fingerprints_must_agree(cache, tmp_path):
    from emofuse.fuse.evaluate import check_fingerprints

    path, encoders = cache
    data = CachedData(path, encoders, ["audio", "text"])
    seed = tmp_path / "seed-0"
    seed.mkdir()
    trained = {"backend": "toy-audio", "dim": 5, "layer": 6}  # the cache's store has no layer 6
    (seed / "model.json").write_text(json.dumps({
        "fingerprints": {"audio": fingerprint(trained), "text": data.fingerprints()["text"]},
        "encoders": {"audio": trained, "text": data.stores["text"].spec}}))
    with pytest.raises(UserError) as e:
        check_fingerprints(seed, data)
    msg = str(e.value)
    assert f"fingerprint {fingerprint(trained)[:12]}, the cache has {data.fingerprints()['audio'][:12]}" in msg
    assert "(layer: model 6, cache (not set))" in msg
    (seed / "model.json").write_text(json.dumps({"fingerprints": data.fingerprints(),
                                                 "encoders": {m: s.spec for m, s in data.stores.items()}}))
    check_fingerprints(seed, data)  # agreeing: no error


def test_per_speaker_standardization(tmp_path):
    """train.speaker_norm: each utterance is standardised with its own speaker's statistics, so a
    speaker's offset (a voice, a microphone) disappears; the labels are never read."""
    rng = np.random.default_rng(0)
    utts = [Utterance(id=f"u{i}", speaker=f"s{i % 2}", split="train", labels={"emotion": "a"}) for i in range(10)]
    write_utterances(utts, tmp_path / "utterances.jsonl")
    (tmp_path / "protocol.json").write_text(json.dumps(vars(Protocol("toy", "emotion", classes=["a"]))))
    spec = {"backend": "toy-audio", "dim": 3}
    store = FeatureStore.create(tmp_path / "audio-toy", "audio", spec, fingerprint(spec), dim=3)
    with store.writer() as w:
        for i, u in enumerate(utts):
            offset = 100.0 if u.speaker == "s1" else -5.0
            w.add(u.id, (offset + rng.standard_normal((4, 3))).astype(np.float32))
    data = CachedData(tmp_path, {"audio": {"backend": "toy-audio"}}, ["audio"])
    raw = {u.id: data.features["audio"][u.id].astype(np.float64) for u in utts}
    data.standardize_per_speaker()
    for spk in ("s0", "s1"):
        ids = [u.id for u in utts if u.speaker == spk]
        frames = np.concatenate([data.features["audio"][i] for i in ids])
        np.testing.assert_allclose(frames.mean(0), 0, atol=1e-3)
        np.testing.assert_allclose(frames.std(0), 1, atol=1e-2)
        mean, std = np.concatenate([raw[i] for i in ids]).mean(0), np.concatenate([raw[i] for i in ids]).std(0)
        np.testing.assert_allclose(data.features["audio"][ids[0]], (raw[ids[0]] - mean) / std, atol=1e-2)
    assert data.features["audio"].get("nope") is None and len(data.features["audio"]) == 10


def test_a_modality_with_no_store_or_no_encoder_is_one_clear_error(cache):
    path, encoders = cache
    with pytest.raises(UserError, match=r"^no video feature store in .*; run `emofuse extract` with this config first$"):
        CachedData(path, dict(encoders, video={"backend": "dlib"}), ["audio", "video"])
    with pytest.raises(UserError, match="modality 'video' is in model.modalities but has no encoder in extract.encoders"):
        CachedData(path, encoders, ["audio", "video"])
