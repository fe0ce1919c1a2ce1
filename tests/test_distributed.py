"""Extraction over a dask.distributed LocalCluster (2 worker processes) writes the same store as the
single-process pipeline, bit for bit, also when it resumes a store holding a scattered subset (the
chunks are cut from all utterances, so their windows and batches are the pipeline's); does no work
the second time; respects the lock."""

import numpy as np
import pytest
import soundfile as sf
import torch

from emofuse.cache.store import CacheError, FeatureStore
from emofuse.config import Config
from emofuse.corpora.base import Corpus, Protocol, Utterance
from emofuse.extract.distributed import connect, extract_distributed
from emofuse.extract.pipeline import extract_corpus

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TEXTS = ["I am so happy today!", "This is terrible, I hate it.", "We went to the office on Tuesday.",
         "Leave me alone.", "What a wonderful surprise", "I don't know what to say"]


def make_corpus(root, n=14):
    rng = np.random.default_rng(0)
    utts = []
    for i in range(n):
        path = root / f"u{i}.wav"
        seconds = 0.3 + 0.1 * (i % 7)
        t = np.arange(int(seconds * 16000)) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (110 + 15 * i) * t) + 0.01 * rng.standard_normal(len(t))
        sf.write(path, wav.astype(np.float32), 16000)
        utts.append(Utterance(id=f"u{i:02d}", audio=str(path), text=TEXTS[i % len(TEXTS)], split="train",
                              labels={"emotion": "neutral"}))
    utts.append(Utterance(id="broken", audio=str(root / "missing.wav"), text="", split="train"))  # fails both
    return Corpus("dist", utts, Protocol(name="test", label="emotion", classes=["neutral"]))


def config(cache, encoders):
    cfg = Config()
    cfg.extract.cache = str(cache)
    cfg.extract.encoders = encoders
    cfg.extract.shard_mb = 0.05  # several shards per writer
    return cfg


def stores(cache):
    return sorted(p for p in (cache / "dist").iterdir() if p.is_dir())


def assert_same_store(a, b):
    sa, sb = FeatureStore(a), FeatureStore(b)
    assert sa.fingerprint == sb.fingerprint and a.name == b.name
    fa, fb = sa.load_all(), sb.load_all()
    assert sorted(fa) == sorted(fb)
    for uid in fa:  # bit for bit
        assert fa[uid].dtype == fb[uid].dtype and np.array_equal(fa[uid], fb[uid]), uid
    assert sa.failures() == sb.failures()
    assert FeatureStore.verify(a) == [] and FeatureStore.verify(b) == []




@pytest.fixture(scope="module")
def client():
    with connect(None, n_workers=2) as c:
        yield c


def test_distributed_equals_local_and_resumes(tmp_path, client):
    corpus = make_corpus(tmp_path)
    quiet = dict(progress=False, log=lambda *a: None)
    one = dict(quiet, torch_threads=1)
    encoders = {"audio": {"backend": "opensmile"}, "text": {"backend": "minilm"}}
    local = extract_corpus(config(tmp_path / "local", encoders), corpus, **quiet)
    assert [r.encoded for r in local] == [14, 14] and [r.failed for r in local] == [1, 1]

    # openSMILE in chunks of 4 (work for both workers); MiniLM with the default chunks, whose
    # windows are the local pipeline's, so its batches are too.
    half = Corpus(corpus.name, corpus.utterances[:6], corpus.protocol)
    audio_cfg = config(tmp_path / "dist", {"audio": encoders["audio"]})
    first = extract_distributed(audio_cfg, half, client, chunk_size=4, **one)
    assert first[0].encoded == 6 and first[0].failed == 0
    rest = extract_distributed(audio_cfg, corpus, client, chunk_size=4, **one)  # resume
    assert rest[0].skipped == 6 and rest[0].encoded == 8 and rest[0].failed == 1
    assert rest[0].failure_reasons == local[0].failure_reasons

    # Text resumes a store that already holds a scattered subset of the local run's features (as
    # earlier runs would have left it): the repeated transcripts share forwards, so their bits
    # depend on the batch plan, and only the pipeline's plan reproduces the local store.
    local_audio, local_text = stores(tmp_path / "local")
    reference = FeatureStore(local_text)
    kept = ["u01", "u03", "u05", "u06", "u09", "u12"]  # left alone or in pairs, others would round otherwise
    pre = FeatureStore.create(tmp_path / "dist" / "dist" / local_text.name, "text", reference.spec,
                              reference.fingerprint, dim=reference.dim)
    with pre.writer("earlier") as w:
        for uid in kept:
            w.add(uid, reference.get(uid))
    text = extract_distributed(config(tmp_path / "dist", {"text": encoders["text"]}), corpus, client, **one)
    assert text[0].skipped == 6 and text[0].encoded == 8 and text[0].failed == 1

    dist_audio, dist_text = stores(tmp_path / "dist")
    assert_same_store(dist_audio, local_audio)
    assert_same_store(dist_text, local_text)
    names = {p.name.split("-")[1] for p in dist_audio.glob("shard-*.h5")}
    # One writer name per chunk, numbered over all utterances: the first run wrote chunks 0 and 1 of
    # its 6, the resumed one chunks 1 (u06, u07), 2 and 3 of the 15; chunk 0 was done and not sent.
    assert names == {"w0", "w1", "w2", "w3"}  # none for the client

    # A second run finds everything done: no task, no new shard, no new failure line.
    before = sorted(p.name for p in dist_audio.iterdir())
    failures = (dist_audio / "failures.jsonl").read_text()
    again = extract_distributed(audio_cfg, corpus, client, chunk_size=4, **one)
    assert again[0].encoded == 0 and again[0].skipped == 15
    assert sorted(p.name for p in dist_audio.iterdir()) == before
    assert (dist_audio / "failures.jsonl").read_text() == failures
    assert (tmp_path / "dist" / "dist" / "utterances.jsonl").is_file()


def test_a_locked_store_is_refused(tmp_path, client):
    corpus = make_corpus(tmp_path, n=3)
    cfg = config(tmp_path / "cache", {"audio": {"backend": "opensmile"}})
    quiet = dict(progress=False, log=lambda *a: None)
    extract_distributed(cfg, Corpus(corpus.name, corpus.utterances[:1], corpus.protocol), client, **quiet)
    (store,) = stores(tmp_path / "cache")
    with FeatureStore(store).writer("local"):  # another extract holds the store
        with pytest.raises(CacheError, match="locked"):
            extract_distributed(cfg, corpus, client, **quiet)
    assert len(FeatureStore(store)) == 1
