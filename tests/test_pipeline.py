"""The extraction pipeline on real encoders: all-layer caches, failures, resume (bit-identical to an
uninterrupted run, whatever was stored before), and that features depend on batching only within
float noise and not at all on the number of preparation threads."""

import random

import numpy as np
import pytest
import torch

from emofuse.cache.store import FeatureStore
from emofuse.corpora.base import Utterance
from emofuse.extract.encoders.base import build_encoder, fingerprint
from emofuse.extract.pipeline import ModalityResult, count_failure, extract_modality, store_path, summary_lines
from emofuse.fuse.model import SSEFT, FusionConfig

TEXTS = ["I am so happy about this!", "", "We went to the office on Tuesday.", "   ",
         "How dare you do this to me? " * 40, "Fine."]


def utterances():
    return [Utterance(id=f"u{i}", text=t, split="train") for i, t in enumerate(TEXTS)]


def test_all_layers_cache_and_failures(tmp_path):
    enc = build_encoder("text", {"backend": "minilm", "layer": "all"})
    result = extract_modality(utterances(), enc, tmp_path, budget=512, progress=False, log=lambda *_: None)
    assert result.encoded == 4 and result.failed == 2  # the empty and whitespace-only transcripts
    store = FeatureStore(result.store)
    assert store.layers == 7 and store.dim == 384
    assert store.get("u0").shape[1:] == (7, 384)
    assert set(store.failures()) == {"u1", "u3"}
    assert store.failures()["u1"]["reason"] == "empty transcript"
    # A second run: nothing to do, failures are not retried.
    again = extract_modality(utterances(), enc, tmp_path, budget=512, progress=False, log=lambda *_: None)
    assert again.encoded == 0 and again.skipped == 6


def test_failure_summary_counts_by_reason(tmp_path):
    enc = build_encoder("text", {"backend": "minilm"})
    utts = utterances() + [Utterance(id="latin1", unusable={"text": "transcript is not valid UTF-8 (byte 0xe9 ...)"})]
    result = extract_modality(utts, enc, tmp_path, budget=512, progress=False, log=lambda *_: None)
    assert result.failed == 3
    lines = summary_lines([result])
    assert lines[0].startswith("text: encoded 4, skipped 0, failed 3 in ")
    assert lines[1] == "  failures: 3 (text: empty transcript: 2, decode: transcript is not valid UTF-8 (byte 0xe9 ...): 1)"
    assert FeatureStore(result.store).failures()["latin1"]["stage"] == "decode"
    # A second run skips them and says so.
    again = extract_modality(utts, enc, tmp_path, budget=512, progress=False, log=lambda *_: None)
    assert again.failed == 0 and again.failed_before == 3
    assert "3 utterance(s) that failed in an earlier run were skipped" in summary_lines([again])[1]
    # One problem in many files is one reason: the utterance's own file name is taken out.
    counted = ModalityResult("audio", "s")
    for name in ("a", "b"):
        utt = Utterance(id=name, audio=f"/data/{name}.wav")
        count_failure(counted, utt, "decode", f"cannot decode audio of /data/{name}.wav: Invalid data")
    assert counted.failure_reasons == {"decode: cannot decode audio of <file>: Invalid data": 2}


QUIET = dict(progress=False, log=lambda *_: None)


def varied_utterances(n: int = 96, seed: int = 0) -> list[Utterance]:
    """Short transcripts of 7-10 tokens: many share a length, hence a forward (text is not padded),
    so an utterance's batch mates change its features in the last bits. One empty transcript fails."""
    rng = random.Random(seed)
    feelings = ["happy", "sad", "angry", "calm", "upset", "glad", "tired", "scared"]
    things = ["office", "party", "game", "news", "dinner", "trip", "movie", "exam"]
    utts = [Utterance(id=f"t{i:03d}", split="train",
                      text=f"I am {rng.choice(feelings)} about the {rng.choice(things)}" + " really" * rng.randint(0, 3) + ".")
            for i in range(n)]
    utts.insert(n // 3, Utterance(id="empty", text="", split="train"))
    return utts


@pytest.fixture()
def small_windows():
    """MiniLM with windows of 24 utterances (4 over varied_utterances), on one torch thread: the
    bit-for-bit comparisons need the same thread count on both sides."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    enc = build_encoder("text", {"backend": "minilm"})
    enc.window_utterances = 24
    yield enc
    torch.set_num_threads(n)


def test_features_independent_of_threads_and_within_noise_of_budget(tmp_path, small_windows):
    """The same batch plan gives the same bits whatever the number of preparation threads. Another
    batch budget is another plan: the features agree within float noise, not bit for bit (text is
    not padded, and a forward of another size rounds differently in the last bits)."""
    utts, enc = varied_utterances(40), small_windows
    a = extract_modality(utts, enc, tmp_path / "a", budget=160, workers=2, **QUIET)
    b = extract_modality(utts, enc, tmp_path / "b", budget=160, workers=1, **QUIET)
    c = extract_modality(utts, enc, tmp_path / "c", budget=1, workers=1, **QUIET)  # every utterance alone
    sa, sb, sc = FeatureStore(a.store), FeatureStore(b.store), FeatureStore(c.store)
    assert sorted(sa.ids()) == sorted(sb.ids()) == sorted(sc.ids())
    for uid in sa.ids():
        np.testing.assert_array_equal(sa.get(uid), sb.get(uid))  # same plan: bit for bit
        # The store holds float16: float32 noise (< 1e-5) flips at most the last float16 bit.
        x, y = sa.get(uid), sc.get(uid)
        ulp = np.spacing(np.maximum(np.abs(x), np.abs(y))).astype(np.float32)
        assert np.all(np.abs(x.astype(np.float32) - y.astype(np.float32)) <= ulp + 1e-5), uid


def test_resume_over_any_stored_subset_is_bit_identical(tmp_path, small_windows, monkeypatch):
    """A store that already holds a scattered subset (not a prefix: whole windows, parts of windows,
    an earlier failure) is completed with exactly the bits of an uninterrupted run: the windows are
    cut from all utterances, a partly done window is prepared whole and only its missing utterances
    are written. Windows with nothing left to do are not even prepared."""
    utts, enc = varied_utterances(), small_windows
    full = extract_modality(utts, enc, tmp_path / "full", budget=160, **QUIET)
    assert full.encoded == 96 and full.failed == 1
    reference = FeatureStore(full.store)
    expected = reference.load_all()

    # An earlier run of the same plan stored: all of window 1, a random part of windows 0, 2 and 3.
    rng = random.Random(5)
    windows = [utts[i : i + 24] for i in range(0, len(utts), 24)]
    stored = {u.id for u in windows[1]} | {u.id for w in windows[:1] + windows[2:] for u in w if rng.random() < 0.5}
    stored.discard("empty")  # it is in window 1: recorded as a failure below instead
    spec = enc.full_spec()
    path = store_path(tmp_path / "resumed", "text", spec)
    store = FeatureStore.create(path, "text", spec, fingerprint(spec), dim=enc.dim)
    with store.writer("local", max_shard_bytes=4096) as w:
        for uid in sorted(stored):
            w.add(uid, expected[uid])
        w.add_failure("empty", **{k: v for k, v in reference.failures()["empty"].items() if k != "id"})
    store.close()

    prepared = []
    prepare = enc.prepare
    monkeypatch.setattr(enc, "prepare", lambda u: prepared.append(u.id) or prepare(u))
    resumed = extract_modality(utts, enc, tmp_path / "resumed", budget=160, **QUIET)
    assert resumed.store == str(path)
    assert resumed.skipped == len(stored) + 1 and resumed.failed_before == 1
    assert resumed.encoded == 96 - len(stored) and resumed.failed == 0  # nothing written or counted twice

    done = FeatureStore(path)
    ids = [uid for shard in done.shards for uid in shard.ids]
    assert len(ids) == len(set(ids)) == len(expected)  # each id exactly once
    for uid, x in expected.items():
        np.testing.assert_array_equal(done.get(uid), x)  # bit-identical to the uninterrupted run
    assert done.failures() == reference.failures()
    assert len((path / "failures.jsonl").read_text().splitlines()) == 1  # the failure not recorded again
    # Window 1 (all done) was not touched; the others were prepared whole, done utterances included.
    assert sorted(prepared) == sorted(u.id for k, w in enumerate(windows) if k != 1 for u in w if u.id != "empty")


@pytest.mark.parametrize("stop_after", [3, 5])  # of 9 batches; both broke bit-identity with windows cut from the todo list
def test_resume_after_an_interruption_is_bit_identical(tmp_path, small_windows, monkeypatch, stop_after):
    """Interrupted in the middle of a window (the writer keeps what it finished, as after Ctrl-C),
    then resumed: the store an uninterrupted run writes, bit for bit."""
    utts, enc = varied_utterances(), small_windows
    expected = FeatureStore(extract_modality(utts, enc, tmp_path / "full", budget=160, **QUIET).store).load_all()

    calls, encode = [], enc.encode

    def interrupted(items):
        calls.append(len(items))
        if len(calls) > stop_after:
            raise KeyboardInterrupt
        return encode(items)

    monkeypatch.setattr(enc, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_modality(utts, enc, tmp_path / "cut", budget=160, shard_bytes=4096, **QUIET)
    monkeypatch.setattr(enc, "encode", encode)
    resumed = extract_modality(utts, enc, tmp_path / "cut", budget=160, **QUIET)
    assert 0 < resumed.skipped < len(utts) and resumed.skipped + resumed.encoded + resumed.failed == len(utts)
    store = FeatureStore(resumed.store)
    assert sorted(store.ids()) == sorted(expected)
    for uid, x in expected.items():
        np.testing.assert_array_equal(store.get(uid), x)


def test_audio_resume_after_an_interruption_is_bit_identical(tmp_path, monkeypatch, one_thread):
    """An audio extraction with padded forwards of several clips, interrupted while full shards were
    being written by the writer's background thread, resumes to the store of an uninterrupted run:
    every utterance once, the same values. (At this model size batch mates do not move the float16
    bits at all, 0 of 47,968 values batched against alone, so this checks the writer and the
    resume, not the batch plan: the text tests above do that.)"""
    import soundfile as sf

    from tests.test_encoders import speech_like, tiny_wav2vec2

    rng = random.Random(3)
    utts = []
    for i in range(24):
        path = tmp_path / f"a{i:02d}.wav"
        sf.write(path, speech_like(rng.uniform(0.5, 2.0), seed=i), 16000)
        utts.append(Utterance(id=f"a{i:02d}", audio=str(path), split="train"))
    enc = build_encoder("audio", {"backend": "hf", "path": tiny_wav2vec2(tmp_path / "w2v", "group")})
    enc.window_utterances = 8  # 3 windows
    budget = 16000 * 4
    expected = FeatureStore(extract_modality(utts, enc, tmp_path / "full", budget=budget, **QUIET).store).load_all()

    calls, sizes, encode = [], [], enc.encode

    def interrupted(items):
        calls.append(len(items))
        if len(calls) > 5:
            raise KeyboardInterrupt
        return encode(items)

    forward = enc._forward_padded
    monkeypatch.setattr(enc, "_forward_padded", lambda inputs, n: sizes.append(len(inputs)) or forward(inputs, n))
    monkeypatch.setattr(enc, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_modality(utts, enc, tmp_path / "cut", budget=budget, shard_bytes=4096, **QUIET)
    assert max(sizes) > 1  # padded forwards of several clips
    monkeypatch.setattr(enc, "encode", encode)
    resumed = extract_modality(utts, enc, tmp_path / "cut", budget=budget, **QUIET)
    assert 0 < resumed.skipped < len(utts) and resumed.skipped + resumed.encoded == len(utts)
    store = FeatureStore(resumed.store)
    assert len(store.shards) > 2 and sorted(store.ids()) == sorted(expected)
    for uid, x in expected.items():
        np.testing.assert_array_equal(store.get(uid), x)


def test_layer_mixing_model_reads_all_layer_cache(tmp_path):
    enc = build_encoder("text", {"backend": "minilm", "layer": "all"})
    extract_modality(utterances(), enc, tmp_path, budget=512, progress=False, log=lambda *_: None)
    store = FeatureStore(next(tmp_path.glob("text-*")))
    model = SSEFT(FusionConfig(modalities=["text"], input_dims={"text": store.dim},
                               num_layers_in={"text": store.layers}, num_outputs=4, self_layers={"text": 1}))
    x = torch.from_numpy(store.get("u0").astype(np.float32))[None]
    out = model({"text": x}, {"text": torch.ones(1, x.shape[1], dtype=torch.bool)})
    assert out.shape == (1, 4)
    weights = model.layer_weights()["text"]  # SUPERB-style softmax weights over the 7 hidden states
    assert len(weights) == 7 and abs(sum(weights) - 1) < 1e-6
