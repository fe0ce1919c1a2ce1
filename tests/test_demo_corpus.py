"""The generated demo corpus: deterministic, real decodable media, speaker-disjoint splits."""

import csv
import json
import shutil

import av
import numpy as np
import pytest
import soundfile as sf

from emofuse.corpora import demo
from emofuse.corpora.base import Corpus
from emofuse.errors import UserError


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return demo.generate(tmp_path_factory.mktemp("demo") / "small", "small", seed=0, progress=False)


def _rows(root):
    with open(root / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_gives_identical_files(small, tmp_path):
    again = demo.generate(tmp_path / "again", "small", seed=0, progress=False)
    assert (small / "metadata.csv").read_bytes() == (again / "metadata.csv").read_bytes()
    for row in _rows(small):
        assert (small / row["audio"]).read_bytes() == (again / row["audio"]).read_bytes(), row["id"]


def test_generate_is_idempotent(small):
    before = {p: p.stat().st_mtime_ns for p in small.rglob("*") if p.is_file()}
    assert demo.generate(small, "small", seed=0, progress=False) == small
    after = {p: p.stat().st_mtime_ns for p in small.rglob("*") if p.is_file()}
    assert before == after
    assert json.loads((small / "demo.json").read_text())["size"] == "small"


def test_a_different_seed_replaces_the_corpus(small, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(small, root)
    demo.generate(root, "small", seed=1, progress=False)
    assert (root / "metadata.csv").read_bytes() != (small / "metadata.csv").read_bytes()
    assert json.loads((root / "demo.json").read_text())["seed"] == 1
    ids = {r["id"] for r in _rows(root)}
    assert {p.stem for p in (root / "audio").iterdir()} == ids
    assert any((root / f"audio/{i}.wav").read_bytes() != (small / f"audio/{i}.wav").read_bytes() for i in ids)


def test_files_exist_and_decode(small):
    rows = _rows(small)
    assert 40 <= len(rows) <= 60
    assert (small / "README.txt").exists()
    for row in rows:
        wav, sr = sf.read(small / row["audio"])
        info = sf.info(small / row["audio"])
        assert sr == demo.SR and wav.ndim == 1 and info.subtype == "PCM_16"
        assert 1.4 <= len(wav) / sr <= 2.6
        assert np.abs(wav).max() > 0.01  # not silence
    for row in rows[:6]:  # decoding every clip adds little: a few are enough
        with av.open(str(small / row["video"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == int(row["frames"]) == round(float(row["duration"]) * demo.FPS)
        assert frames[0].shape == (demo.FRAME, demo.FRAME, 3)
        assert frames[0].std() > 10  # a picture, not a flat frame


def test_splits_are_by_speaker_and_hold_every_class(small):
    rows = _rows(small)
    speakers = {s: {r["speaker"] for r in rows if r["split"] == s} for s in ("train", "dev", "test")}
    assert all(speakers.values())
    assert not (speakers["train"] & speakers["dev"] or speakers["train"] & speakers["test"]
                or speakers["dev"] & speakers["test"])
    for split in ("train", "dev", "test"):
        assert {r["emotion"] for r in rows if r["split"] == split} == set(demo.CLASSES)


def test_every_sample_has_a_clear_modality(small):
    for row in _rows(small):
        n_clear = sum(int(row[f"clear_{m}"]) for m in ("audio", "text", "video"))
        assert 1 <= n_clear <= 3
        if row["clear_audio"] == "1":
            assert row["audio_class"] == row["emotion"]
        if row["clear_video"] == "1":
            assert row["video_class"] == row["emotion"]


def test_ids_look_like_speaker_and_number(small):
    for row in _rows(small):
        assert row["id"].startswith(row["speaker"] + "_")
        spk, num = row["id"].split("_")
        assert spk.startswith("spk") and len(num) == 4 and num.isdigit()


def test_load_returns_the_corpus(small):
    corpus = demo.load(small)
    assert isinstance(corpus, Corpus) and corpus.name == "demo"
    assert corpus.protocol.name == "demo-4class" and corpus.protocol.label == "emotion"
    assert corpus.protocol.classes == demo.CLASSES == ["neutral", "happy", "sad", "angry"]
    rows = _rows(small)
    assert [u.id for u in corpus.utterances] == [r["id"] for r in rows]
    u = corpus.utterances[0]
    assert u.labels == {"emotion": rows[0]["emotion"]} and u.text == rows[0]["text"]
    assert u.speaker == rows[0]["speaker"] and u.split == rows[0]["split"]
    assert (small / rows[0]["audio"]).samefile(u.audio) and (small / rows[0]["video"]).samefile(u.video)
    assert len(corpus.split("train")) + len(corpus.split("dev")) + len(corpus.split("test")) == len(rows)


def test_load_without_corpus_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="generate"):
        demo.load(tmp_path)


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(UserError, match="size"):
        demo.generate(tmp_path, "huge", progress=False)
