"""Corpus readers: miniature fakes of each release's exact layout, plus the real files in
../shared/data where they exist (those tests skip without it)."""

import csv
import json
from collections import Counter
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
import soundfile as sf

from emofuse.config import CorpusConfig
from emofuse.corpora import cmu, emodb, iemocap, load_corpus, manifest, meld, ravdess
from emofuse.errors import PrepareError, UserError
from emofuse.extract.media import load_audio

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared(*parts) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it sits beside the repository in CI)")
    return path


def write_wav(path: Path, seconds: float = 0.2, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.1 * np.sin(2 * np.pi * 220 * t), sr, subtype="PCM_16")
    return path


def write_mp4(path: Path, seconds: float = 0.5, fps: int = 10, sr: int = 16000) -> Path:
    """A tiny real clip with a video and an audio stream, as MELD's are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        aus = out.add_stream("aac", rate=sr)
        aus.layout = "mono"
        for i in range(int(seconds * fps)):
            img = np.full((32, 32, 3), 10 * i, dtype=np.uint8)
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(vs.encode(None))
        wav = (0.1 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * sr)) / sr)).astype(np.float32)
        for i in range(0, len(wav), 1024):
            frame = av.AudioFrame.from_ndarray(wav[None, i : i + 1024], format="flt", layout="mono")
            frame.sample_rate, frame.pts = sr, i
            out.mux(aus.encode(frame))
        out.mux(aus.encode(None))
    return path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# ------------------------------------------------------------------------------------------ MELD

MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
               "Season", "Episode", "StartTime", "EndTime"]


def write_meld_csv(path: Path, rows):
    """rows: (utterance, speaker, emotion, sentiment, dialogue, utterance id)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(MELD_HEADER)
        for n, (text, spk, emo, sent, d, u) in enumerate(rows, start=1):
            w.writerow([n, text, spk, emo, sent, d, u, 8, 21, f"00:16:{16 + u:02d},059", f"00:16:{18 + u:02d},731"])


@pytest.fixture
def meld_root(tmp_path):
    root = tmp_path / "MELD.Raw"
    write_meld_csv(root / "train_sent_emo.csv", [
        ("also I was the point person on my company\x92s transition", "Chandler", "neutral", "neutral", 0, 0),
        ("You must\u2019ve had your hands full\u2026", "The Interviewer", "joy", "positive", 0, 1),
        ("Oh, \u201cgreat\u201d, that\u00e2\u20ac\u2122s it! \u00e2\u20ac\u0153Fine\u00e2\u20ac\x9d", "Ross", "anger",
         "negative", 1, 0),
    ])
    write_meld_csv(root / "dev_sent_emo.csv", [("Oh my God\x97no.", "Monica", "surprise", "negative", 0, 0)])
    write_meld_csv(root / "test_sent_emo.csv", [("Why?", "Joey", "sadness", "negative", 0, 0),
                                                ("Fine.", "Joey", "fear", "negative", 0, 1)])
    write_mp4(root / "train_splits" / "dia0_utt0.mp4")
    (root / "dev_splits_complete").mkdir()
    (root / "dev_splits_complete" / "dia0_utt0.mp4").write_bytes(b"\x00\x00\x00 not an mp4 at all")
    (root / "output_repeated_splits_test").mkdir()  # its clips are missing
    return root


def test_meld_ids_labels_splits_and_text(meld_root):
    c = meld.load(meld_root)
    assert c.name == "meld" and c.protocol.name == "meld-emotion" and c.protocol.label == "emotion"
    assert c.protocol.classes == ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
    by_id = {u.id: u for u in c.utterances}
    assert list(by_id) == ["train_dia0_utt0", "train_dia0_utt1", "train_dia1_utt0", "dev_dia0_utt0",
                           "test_dia0_utt0", "test_dia0_utt1"]
    u = by_id["train_dia0_utt1"]
    assert (u.speaker, u.dialogue, u.split) == ("The Interviewer", "train_dia0", "train")
    assert u.labels["emotion"] == "joy" and u.labels["sentiment"] == "positive"
    assert u.labels["episode_start"] == pytest.approx(16 * 60 + 17.059)
    assert u.labels["episode_end"] == pytest.approx(16 * 60 + 19.731)
    assert u.start is None and u.end is None  # a clip holds the utterance: no cut inside it
    # The three forms of MELD's cp1252 punctuation all become ASCII.
    assert by_id["train_dia0_utt0"].text == "also I was the point person on my company's transition"
    assert u.text == "You must've had your hands full..."
    assert by_id["train_dia1_utt0"].text == "Oh, \"great\", that's it! \"Fine\""
    assert by_id["dev_dia0_utt0"].text == "Oh my God-no."
    assert {u.split for u in c.utterances} == {"train", "dev", "test"}


def test_meld_clips_and_failure_path(meld_root):
    by_id = {u.id: u for u in meld.load(meld_root).utterances}
    good, corrupt, missing = by_id["train_dia0_utt0"], by_id["dev_dia0_utt0"], by_id["test_dia0_utt0"]
    assert good.audio == good.video == str((meld_root / "train_splits" / "dia0_utt0.mp4").resolve())
    assert corrupt.video.endswith("dev_splits_complete/dia0_utt0.mp4")
    assert missing.video.endswith("output_repeated_splits_test/dia0_utt0.mp4")
    assert len(load_audio(good.audio)) > 0
    # Broken or missing clips are the extraction's per-utterance failures, not the reader's crash.
    for u in (corrupt, missing):
        with pytest.raises(PrepareError):
            load_audio(u.audio)


def test_meld_text_only_copy_and_sentiment_protocol(tmp_path, meld_root):
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    for s in ("train", "dev", "test"):
        (text_only / f"{s}_sent_emo.csv").write_bytes((meld_root / f"{s}_sent_emo.csv").read_bytes())
    c = load_corpus(CorpusConfig(name="meld", root=str(text_only), protocol="sentiment"))
    assert c.protocol.name == "meld-sentiment" and c.protocol.classes == ["negative", "neutral", "positive"]
    assert all(u.audio is None and u.video is None and u.text for u in c.utterances)


def test_meld_errors(tmp_path, meld_root):
    with pytest.raises(UserError, match="protocol"):
        meld.load(meld_root, protocol="arousal")
    with pytest.raises(UserError, match="no options"):
        meld.load(meld_root, fold=1)
    (meld_root / "dev_sent_emo.csv").unlink()
    with pytest.raises(UserError, match="dev_sent_emo.csv"):
        meld.load(meld_root)


def test_meld_real_counts():
    root = shared("meld")
    c = meld.load(root)
    assert Counter(u.split for u in c.utterances) == {"train": 9989, "dev": 1109, "test": 2610}
    published = {  # MELD paper / README, per split
        "train": {"neutral": 4710, "joy": 1743, "surprise": 1205, "anger": 1109, "sadness": 683, "disgust": 271, "fear": 268},
        "dev": {"neutral": 470, "joy": 163, "surprise": 150, "anger": 153, "sadness": 111, "disgust": 22, "fear": 40},
        "test": {"neutral": 1256, "joy": 402, "surprise": 281, "anger": 345, "sadness": 208, "disgust": 68, "fear": 50},
    }
    for split, counts in published.items():
        assert Counter(u.labels["emotion"] for u in c.split(split)) == counts
    assert len({u.id for u in c.utterances}) == len(c.utterances)
    assert not any(ch in u.text for u in c.utterances for ch in "\u2019\u2018\u201c\u201d\u2026\x92")


# ------------------------------------------------------------------------------------ CMU-MOSI/MOSEI


def fold_videos(name):
    folds = json.loads((cmu.FOLDS_DIR / f"cmu_{name}_standard_folds.json").read_text())["folds"]
    return folds["train"], folds["valid"], folds["test"]


def test_cmu_packaged_folds():
    for name, sizes in (("mosi", (52, 10, 31)), ("mosei", (2249, 300, 678))):
        train, valid, test = fold_videos(name)
        assert (len(train), len(valid), len(test)) == sizes
        assert not (set(train) & set(valid) or set(train) & set(test) or set(valid) & set(test))
        assert Counter(cmu.standard_folds(name).values()) == dict(zip(("train", "dev", "test"), sizes))


def test_mosi_label_csv_mmsa_with_segmented_media(tmp_path):
    train, valid, test = fold_videos("mosi")
    v_train, v_dev, v_test = "I5y0__X72p0", valid[0], test[0]  # an id with underscores of its own
    assert v_train in train
    root = tmp_path / "MOSI"
    root.mkdir()
    with open(root / "label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "clip_id", "text", "label", "label_T", "label_A", "label_V", "annotation", "mode"])
        w.writerow([v_train, 1, "anyhow it was really good", 2.4, 2.0, 1.0, 3.0, "Positive", "train"])
        w.writerow([v_train, 2, "but not a whole bunch", -1.75, "", "", "", "Negative", "train"])
        w.writerow([v_dev, 3, "it was okay", 0.0, "", "", "", "Neutral", "valid"])
        w.writerow([v_test, 1, "i hated it", -3.0, "", "", "", "Negative", "test"])
    seg_wav = write_wav(root / "Raw" / "Audio" / "WAV_16000" / "Segmented" / f"{v_train}_1.wav")
    seg_mp4 = touch(root / "Raw" / "Video" / "Segmented" / f"{v_train}_1.mp4")
    mmsa_mp4 = touch(root / "Raw" / v_test / "1.mp4")  # MMSA's Raw/<video>/<clip>.mp4

    c = cmu.load(root, name="mosi")
    assert c.name == "mosi" and c.protocol.name == "mosi-sentiment-regression"
    assert c.protocol.task == "regression" and c.protocol.label == "sentiment" and c.protocol.classes == []
    by_id = {u.id: u for u in c.utterances}
    assert list(by_id) == [f"{v_train}_1", f"{v_train}_2", f"{v_dev}_3", f"{v_test}_1"]
    u = by_id[f"{v_train}_1"]
    assert (u.speaker, u.dialogue, u.split, u.text) == (v_train, v_train, "train", "anyhow it was really good")
    assert u.labels == {"sentiment": 2.4, "sentiment_text": 2.0, "sentiment_audio": 1.0, "sentiment_video": 3.0,
                        "annotation": "Positive"}
    assert (u.audio, u.video, u.start, u.end) == (str(seg_wav.resolve()), str(seg_mp4.resolve()), None, None)
    assert by_id[f"{v_train}_2"].audio is None and by_id[f"{v_train}_2"].video is None
    assert by_id[f"{v_dev}_3"].split == "dev" and by_id[f"{v_test}_1"].split == "test"
    assert by_id[f"{v_test}_1"].video == str(mmsa_mp4.resolve())
    # splits=csv follows the `mode` column instead of the packaged folds.
    assert [u.split for u in cmu.load(root, name="mosi", splits="csv").utterances] == ["train", "train", "dev", "test"]


def write_csd(path: Path, top: str, data: dict, dims=None):
    with h5py.File(path, "w") as f:
        g = f.create_group(top)
        for video, (features, intervals) in data.items():
            v = g.create_group(f"data/{video}")
            v["features"] = np.asarray(features)
            v["intervals"] = np.asarray(intervals, dtype=np.float64)
        if dims is not None:
            g.create_group("metadata")["dimension names"] = [json.dumps(dims)]


def test_mosi_csd_with_full_media_cut_by_interval(tmp_path):
    train, valid, _ = fold_videos("mosi")
    root = tmp_path / "CMU_MOSI"
    root.mkdir()
    # Intervals stored out of order: segment numbers follow time (MOSI numbers its segments from 1).
    write_csd(root / "CMU_MOSI_Opinion_Labels.csd", "Opinion Segment Labels", {
        train[0]: ([[1.5], [-0.6]], [[10.0, 12.5], [2.0, 4.0]]),
        valid[0]: ([[0.0]], [[0.5, 1.0]]),
    })
    tdir = root / "Raw" / "Transcript" / "Segmented"
    tdir.mkdir(parents=True)
    (tdir / f"{train[0]}.annotprocessed").write_text("1_DELIM_I DID NOT LIKE IT \n2_DELIM_BUT THE END WAS GREAT\n")
    full_wav = write_wav(root / "Raw" / "Audio" / "WAV_16000" / "Full" / f"{train[0]}.wav", seconds=1.0)
    full_mp4 = touch(root / "Raw" / "Video" / "Full" / f"{train[0]}.mp4")

    c = load_corpus(CorpusConfig(name="mosi", root=str(root)))  # the dispatcher passes name="mosi"
    by_id = {u.id: u for u in c.utterances}
    first, second = by_id[f"{train[0]}_1"], by_id[f"{train[0]}_2"]
    assert first.labels == {"sentiment": -0.6} and (first.start, first.end) == (2.0, 4.0)
    assert second.labels == {"sentiment": 1.5} and (second.start, second.end) == (10.0, 12.5)
    assert first.text == "I DID NOT LIKE IT" and second.text == "BUT THE END WAS GREAT"
    assert (first.audio, first.video) == (str(full_wav.resolve()), str(full_mp4.resolve()))
    assert first.split == "train" and by_id[f"{valid[0]}_1"].split == "dev"
    assert by_id[f"{valid[0]}_1"].audio is None and by_id[f"{valid[0]}_1"].start is None


def test_mosei_csd_emotions_transcripts_and_words(tmp_path):
    train, _, test = fold_videos("mosei")
    root = tmp_path / "CMU_MOSEI"
    (root / "Raw").mkdir(parents=True)
    feats = [[1.0, 2.0, 0.0, 0.0, 0.3333333, 0.0, 0.0], [-2.0, 0.0, 1.6666666, 1.0, 0.0, 0.0, 0.0]]
    write_csd(root / "CMU_MOSEI_Labels.csd", "All Labels", {
        train[0]: (feats, [[3.25, 7.5], [8.0, 9.0]]),
        test[0]: ([feats[0]], [[0.0, 2.0]]),
    })  # no "dimension names": the SDK's column order is assumed
    tdir = root / "Raw" / "Transcript" / "Segmented" / "Combined"
    tdir.mkdir(parents=True)
    (tdir / f"{train[0]}.txt").write_text(
        f"{train[0]}___4___3.25___7.5___i really liked this movie\n{train[0]}___5___8.0___9.0___not the ending___sadly\n")
    write_csd(root / "CMU_MOSEI_TimestampedWords.csd", "words", {
        test[0]: ([[b"sp"], [b"so"], [b"good"], [b"later"]], [[0.0, 0.2], [0.2, 0.9], [0.9, 2.0], [2.0, 3.0]]),
    })
    seg_mp4 = touch(root / "Raw" / "Videos" / "Segmented" / "Combined" / f"{train[0]}_4.mp4")
    full_wav = write_wav(root / "Raw" / "Audio" / "Full" / "WAV_16000" / f"{test[0]}.wav")

    c = cmu.load(root, protocol="sentiment", name="mosei")
    assert c.name == "mosei" and c.protocol.name == "mosei-sentiment-regression"
    by_id = {u.id: u for u in c.utterances}
    u4, u5, t0 = by_id[f"{train[0]}_4"], by_id[f"{train[0]}_5"], by_id[f"{test[0]}_0"]
    assert u4.labels == {"sentiment": 1.0, "happy": 2.0, "sad": 0.0, "anger": 0.0, "surprise": 0.333333,
                         "disgust": 0.0, "fear": 0.0}
    assert u5.labels["sad"] == 1.666667 and u5.text == "not the ending___sadly"
    assert u4.text == "i really liked this movie" and u4.video == str(seg_mp4.resolve()) and u4.start is None
    assert u5.video is None and u5.audio is None  # no segment file, no full recording
    assert t0.text == "so good" and t0.split == "test"  # words inside the interval, pauses left out
    assert (t0.audio, t0.start, t0.end) == (str(full_wav.resolve()), 0.0, 2.0)

    # The six emotions as a multi-label protocol: an emotion is present when its intensity is > 0.
    e = cmu.load(root, protocol="emotions-multilabel", name="mosei")
    assert e.protocol.name == "mosei-emotions-multilabel" and e.protocol.task == "multilabel"
    assert e.protocol.classes == ["happy", "sad", "anger", "surprise", "disgust", "fear"]
    by_id = {u.id: u for u in e.utterances}
    assert by_id[f"{train[0]}_4"].labels["emotions"] == ["happy", "surprise"]
    assert by_id[f"{train[0]}_5"].labels["emotions"] == ["sad", "anger"]
    with pytest.raises(UserError, match="emotions-multilabel"):
        cmu.load(root, protocol="emotions-regression", name="mosei")


def test_cmu_errors(tmp_path):
    with pytest.raises(UserError, match="label.csv"):
        cmu.load(tmp_path, name="mosi")
    (tmp_path / "label.csv").write_text("id,text,label\nabc_1,hi,1.0\n")
    with pytest.raises(UserError, match="protocol"):
        cmu.load(tmp_path, protocol="7class", name="mosi")
    with pytest.raises(UserError, match="unknown option"):
        cmu.load(tmp_path, name="mosi", fold=1)
    with pytest.raises(UserError, match="mode"):
        cmu.load(tmp_path, name="mosi", splits="csv")
    with pytest.raises(UserError, match="mosi or mosei"):
        cmu.load(tmp_path, name="mosei2")
    assert cmu.load(tmp_path, name="mosi").utterances[0].split is None  # not a standard-fold video
    (tmp_path / "bad.csd").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="bad.csd"):
        cmu.load(tmp_path, name="mosi", labels="bad.csd")


def test_mosi_real_counts_and_folds_agree_with_mode():
    root = shared("mosi")
    c = cmu.load(root, name="mosi")
    assert Counter(u.split for u in c.utterances) == {"train": 1281, "dev": 229, "test": 685}
    with open(root / "label.csv", newline="", encoding="utf-8") as f:
        mode = {r["id"]: {"valid": "dev"}.get(r["mode"], r["mode"]) for r in csv.DictReader(f)}
    assert len(mode) == len(c.utterances) == 2195
    assert all(u.split == mode[u.id] for u in c.utterances)
    assert len({u.dialogue for u in c.utterances}) == 93
    assert all(-3 <= u.labels["sentiment"] <= 3 and u.text for u in c.utterances)


# ---------------------------------------------------------------------------------------- IEMOCAP

# Per dialogue: (turn, code); every session has one dialogue led by each actor.
IEMOCAP_TURNS = [("F000", "neu"), ("M000", "hap"), ("F001", "exc"), ("M001", "sad"), ("F002", "ang"),
                 ("M002", "fru"), ("F003", "xxx"), ("M003", "oth")]


def write_iemocap(root: Path, avi: bool = True) -> Path:
    for s in range(1, 6):
        sdir = root / f"Session{s}"
        for dialogue in (f"Ses0{s}F_impro01", f"Ses0{s}M_script01_1"):
            eval_lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            trn_lines = []
            for k, (turn, code) in enumerate(IEMOCAP_TURNS):
                utt, start, end = f"{dialogue}_{turn}", 2.0 * k + 0.25, 2.0 * k + 1.75
                eval_lines += [f"[{start:.4f} - {end:.4f}]\t{utt}\t{code}\t[2.5000, 3.0000, 3.5000]",
                               "C-E2:\tNeutral;\t()", "C-E3:\tNeutral;\t()", "A-E3:\tval 3; act 2; dom  2;\t()", ""]
                trn_lines.append(f"{utt} [{start:08.4f}-{end:08.4f}]: Turn {k} of {dialogue} [LAUGHTER]")
                write_wav(sdir / "sentences" / "wav" / dialogue / f"{utt}.wav", seconds=0.05)
            trn_lines.append(f"{dialogue}_MXX0 [000.0000-001.0000]: (not a labelled turn)")
            (sdir / "dialog" / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
            (sdir / "dialog" / "EmoEvaluation" / f"{dialogue}.txt").write_text("\n".join(eval_lines) + "\n")
            (sdir / "dialog" / "transcriptions").mkdir(parents=True, exist_ok=True)
            (sdir / "dialog" / "transcriptions" / f"{dialogue}.txt").write_text("\n".join(trn_lines) + "\n")
            write_wav(sdir / "dialog" / "wav" / f"{dialogue}.wav", seconds=0.05)
            if avi:
                touch(sdir / "dialog" / "avi" / "DivX" / f"{dialogue}.avi")
        (sdir / "dialog" / "EmoEvaluation" / "Categorical").mkdir()  # the release's subfolders are skipped
    return root


@pytest.fixture(scope="module")
def iemocap_root(tmp_path_factory):
    return write_iemocap(tmp_path_factory.mktemp("iemocap") / "IEMOCAP_full_release")


def test_iemocap_default_4class_fold1(iemocap_root):
    c = iemocap.load(iemocap_root)
    assert c.name == "iemocap" and c.protocol.name == "iemocap-4class-exc2hap-fold1"
    assert c.protocol.label == "emotion4" and c.protocol.classes == ["neutral", "happy", "sad", "angry"]
    by_id = {u.id: u for u in c.utterances}
    # fru, xxx and oth are out of the 4 classes: dropped. exc is merged into happy.
    assert len(c.utterances) == 5 * 2 * 5
    assert "Ses01F_impro01_M002" not in by_id and "Ses01F_impro01_F003" not in by_id
    u = by_id["Ses01F_impro01_F001"]
    assert u.labels["emotion"] == "excited" and u.labels["emotion4"] == "happy"
    assert (u.labels["valence"], u.labels["arousal"], u.labels["dominance"]) == (2.5, 3.0, 3.5)
    assert (u.speaker, u.dialogue, u.labels["session"], u.labels["gender"]) == ("Ses01F", "Ses01F_impro01", 1, "F")
    assert u.text == "Turn 2 of Ses01F_impro01 [LAUGHTER]"
    # The dialogue's avi and wav, both cut at the EmoEvaluation times.
    assert u.video.endswith("Session1/dialog/avi/DivX/Ses01F_impro01.avi")
    assert u.audio.endswith("Session1/dialog/wav/Ses01F_impro01.wav")
    assert (u.start, u.end) == (4.25, 5.75)
    # Leave-one-session-out: session 1 tests, the female actor of session 2 is dev.
    speakers = {s: {u.speaker for u in c.split(s)} for s in ("train", "dev", "test")}
    assert speakers["test"] == {"Ses01F", "Ses01M"} and speakers["dev"] == {"Ses02F"}
    assert len(speakers["train"]) == 7 and not speakers["train"] & (speakers["dev"] | speakers["test"])


@pytest.mark.parametrize("fold, dev", [(2, "Ses03M"), ("03", "Ses04F"), (4, "Ses05M"), (5, "Ses01F")])
def test_iemocap_loso_folds(iemocap_root, fold, dev):
    c = iemocap.load(iemocap_root, fold=fold)
    test = int(fold)
    assert {u.labels["session"] for u in c.split("test")} == {test}
    assert {u.speaker for u in c.split("dev")} == {dev}
    assert all(u.labels["session"] != test for u in c.split("train") + c.split("dev"))
    assert c.protocol.name.endswith(f"fold{test}")


def test_iemocap_paper_protocol_keeps_validation_apart_from_test(iemocap_root):
    c = iemocap.load(iemocap_root, protocol="paper")
    assert c.protocol.name == "iemocap-4class-exc2hap-paper"
    assert {u.labels["session"] for u in c.split("test")} == {5}
    assert c.split("dev") and all(u.labels["session"] != 5 for u in c.split("dev"))
    assert {u.labels["session"] for u in c.split("train")} == {1, 2, 3, 4}
    # dev takes whole dialogues: no conversation is split between train and dev.
    assert not {u.dialogue for u in c.split("dev")} & {u.dialogue for u in c.split("train")}
    assert len(c.split("test")) == 2 * 5
    with pytest.raises(UserError, match="paper"):
        iemocap.load(iemocap_root, protocol="paper", fold=5)


def test_iemocap_binary_heads_protocol(iemocap_root):
    """The paper's objective: one binary head per emotion, on the same utterances and splits."""
    single, binary = iemocap.load(iemocap_root, protocol="paper"), iemocap.load(iemocap_root, protocol="4class-binary-paper")
    assert binary.protocol.name == "iemocap-4class-exc2hap-binary-paper" and binary.protocol.task == "multilabel"
    assert binary.protocol.classes == single.protocol.classes == ["neutral", "happy", "sad", "angry"]
    assert [(u.id, u.split) for u in binary.utterances] == [(u.id, u.split) for u in single.utterances]
    assert iemocap.load(iemocap_root, protocol="binary", fold=2).protocol.name == "iemocap-4class-exc2hap-binary-fold2"
    with pytest.raises(UserError, match="binary"):
        iemocap.load(iemocap_root, protocol="4class-bin")


def test_iemocap_6class_and_merge_option(iemocap_root):
    c = iemocap.load(iemocap_root, protocol="6class", fold=1)
    assert c.protocol.label == "emotion6" and c.protocol.classes[-2:] == ["excited", "frustrated"]
    assert Counter(u.labels["emotion6"] for u in c.utterances) == {e: 10 for e in c.protocol.classes}
    strict = iemocap.load(iemocap_root, merge_excited="false")  # as a string from the command line
    assert strict.protocol.name == "iemocap-4class-fold1"
    assert not any(u.labels["emotion"] == "excited" for u in strict.utterances)
    with pytest.raises(UserError, match="merge_excited"):
        iemocap.load(iemocap_root, protocol="6class", merge_excited=True)


def test_iemocap_face_side_rule(iemocap_root):
    by_id = {u.id: u for u in iemocap.load(iemocap_root).utterances}
    # The actor named in the dialogue (wearing the markers) is on the left half.
    assert by_id["Ses01F_impro01_F000"].labels["face_side"] == "left"
    assert by_id["Ses01F_impro01_M000"].labels["face_side"] == "right"
    assert by_id["Ses01M_script01_1_M000"].labels["face_side"] == "left"
    assert by_id["Ses01M_script01_1_F000"].labels["face_side"] == "right"
    flipped = {u.id: u for u in iemocap.load(iemocap_root, side_rule="lead-right").utterances}
    assert flipped["Ses01F_impro01_F000"].labels["face_side"] == "right"
    assert all("face_side" not in u.labels for u in iemocap.load(iemocap_root, side_rule="none").utterances)


def test_iemocap_media_modes_and_unlabelled(tmp_path, iemocap_root):
    u = next(u for u in iemocap.load(iemocap_root, media="sentences").utterances if u.id == "Ses02M_script01_1_F000")
    assert u.audio.endswith("Session2/sentences/wav/Ses02M_script01_1/Ses02M_script01_1_F000.wav")
    assert u.video is None and u.start is None and u.end is None
    no_video = write_iemocap(tmp_path / "audio_only", avi=False)  # auto -> per-utterance wavs
    assert all(u.video is None and u.audio.endswith(f"{u.id}.wav") for u in iemocap.load(no_video).utterances)
    kept = iemocap.load(iemocap_root, keep_unlabelled=True)
    xxx = next(u for u in kept.utterances if u.id == "Ses03F_impro01_F003")
    assert xxx.split is None and xxx.labels["emotion"] == "no_agreement" and "emotion4" not in xxx.labels
    assert len(kept.utterances) == 5 * 2 * len(IEMOCAP_TURNS)


def test_iemocap_errors(tmp_path, iemocap_root):
    for kwargs, match in [({"fold": 6}, "fold"), ({"protocol": "7class"}, "protocol"),
                          ({"fold": 2, "dev_speaker": "Ses02F"}, "dev_speaker"), ({"side_rule": "female-left"}, "side_rule"),
                          ({"media": "mocap"}, "media"), ({"folds": 2}, "unknown option")]:
        with pytest.raises(UserError, match=match):
            iemocap.load(iemocap_root, **kwargs)
    with pytest.raises(UserError, match="EmoEvaluation"):
        iemocap.load(tmp_path / "empty")


# ----------------------------------------------------------------------------------------- Emo-DB


@pytest.fixture
def emodb_root(tmp_path):
    for name in ("03a01Fa", "03a01Nc", "03b10Wb", "08a02Ta", "08a04Ld", "10a05Aa", "10b01Ea", "16b03Wa"):
        write_wav(tmp_path / "emodb" / "wav" / f"{name}.wav", seconds=0.05)
    return tmp_path / "emodb"


def test_emodb_labels_and_leave_one_speaker_out(emodb_root):
    c = emodb.load(emodb_root)
    assert c.name == "emodb" and c.protocol.name == "emodb-loso-03" and len(c.protocol.classes) == 7
    by_id = {u.id: u for u in c.utterances}
    u = by_id["03a01Fa"]
    assert (u.speaker, u.text, u.video, u.labels["emotion"], u.labels["sentence"]) == ("03", None, None, "happiness", "a01")
    assert [by_id[i].labels["emotion"] for i in ("03b10Wb", "08a02Ta", "08a04Ld", "10a05Aa", "10b01Ea")] == \
        ["anger", "sadness", "boredom", "fear", "disgust"]
    assert by_id["08a02Ta"].labels["gender"] == "female" and u.labels["gender"] == "male"
    assert {u.speaker for u in c.split("test")} == {"03"} and {u.speaker for u in c.split("dev")} == {"08"}
    c = emodb.load(emodb_root, protocol="loso", fold=16)  # an int from the command line; dev wraps around
    assert {u.speaker for u in c.split("test")} == {"16"} and {u.speaker for u in c.split("dev")} == {"03"}
    assert emodb.load(emodb_root, fold="08").protocol.name == "emodb-loso-08"


def test_emodb_errors(tmp_path, emodb_root):
    with pytest.raises(UserError, match="fold"):
        emodb.load(emodb_root, fold=4)
    with pytest.raises(UserError, match="protocol"):
        emodb.load(emodb_root, protocol="random")
    with pytest.raises(UserError, match="wav"):
        emodb.load(tmp_path / "nothing")
    write_wav(emodb_root / "wav" / "readme.wav", seconds=0.01)
    with pytest.raises(UserError, match="readme.wav"):
        emodb.load(emodb_root)


def test_emodb_real_counts():
    c = emodb.load(shared("emodb"))
    assert len(c.utterances) == 535
    assert len({u.speaker for u in c.utterances}) == 10
    assert Counter(u.labels["emotion"] for u in c.utterances) == {
        "anger": 127, "boredom": 81, "disgust": 46, "fear": 69, "happiness": 71, "sadness": 62, "neutral": 79}
    for speaker in sorted({u.speaker for u in c.utterances}):
        fold = emodb.load(shared("emodb"), fold=speaker)
        groups = [{u.speaker for u in fold.split(s)} for s in ("train", "dev", "test")]
        assert groups[2] == {speaker} and len(groups[1]) == 1 and len(groups[0]) == 8
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


# ---------------------------------------------------------------------------------------- RAVDESS


@pytest.fixture
def ravdess_root(tmp_path):
    root = tmp_path / "ravdess"
    for actor in range(1, 7):
        for emotion in ("01", "05", "08"):
            rec = f"01-{emotion}-01-02-01-{actor:02d}"
            write_wav(root / "Audio_Speech_Actors_01-24" / f"Actor_{actor:02d}" / f"03-{rec}.wav", seconds=0.05)
            if actor <= 2:
                touch(root / f"Video_Speech_Actor_{actor:02d}" / f"Actor_{actor:02d}" / f"01-{rec}.mp4")
                touch(root / f"Video_Speech_Actor_{actor:02d}" / f"Actor_{actor:02d}" / f"02-{rec}.mp4")
        write_wav(root / "Audio_Song_Actors_01-24" / f"Actor_{actor:02d}" / f"03-02-03-02-01-02-{actor:02d}.wav",
                  seconds=0.05)
    return root


def test_ravdess_recordings_labels_and_actor_folds(ravdess_root):
    c = ravdess.load(ravdess_root)
    assert c.name == "ravdess" and c.protocol.name == "ravdess-8class-test01+02" and len(c.protocol.classes) == 8
    assert len(c.utterances) == 6 * 3  # speech only; video-only files skipped; one record per recording
    by_id = {u.id: u for u in c.utterances}
    u = by_id["01-05-01-02-01-01"]
    assert u.audio.endswith("Actor_01/03-01-05-01-02-01-01.wav") and u.video.endswith("Actor_01/01-01-05-01-02-01-01.mp4")
    assert (u.speaker, u.text) == ("Actor_01", "Dogs are sitting by the door")
    assert u.labels == {"emotion": "angry", "intensity": "normal", "channel": "speech", "repetition": 1, "gender": "male"}
    assert by_id["01-08-01-02-01-04"].video is None and by_id["01-08-01-02-01-04"].labels["gender"] == "female"
    assert {u.speaker for u in c.split("test")} == {"Actor_01", "Actor_02"}
    assert {u.speaker for u in c.split("dev")} == {"Actor_03", "Actor_04"}
    one = ravdess.load(ravdess_root, fold="5")
    assert {u.speaker for u in one.split("test")} == {"Actor_05"} and {u.speaker for u in one.split("dev")} == {"Actor_06"}
    explicit = ravdess.load(ravdess_root, fold=[6], dev="1, 2")
    assert {u.speaker for u in explicit.split("dev")} == {"Actor_01", "Actor_02"}
    song = ravdess.load(ravdess_root, channel="song")
    assert len(song.utterances) == 6 and song.utterances[0].labels["channel"] == "song"
    assert song.utterances[0].text == "Kids are talking by the door"


def test_ravdess_errors(tmp_path, ravdess_root):
    for kwargs, match in [({"fold": 25}, "fold"), ({"fold": 1, "dev": 1}, "disjoint"), ({"channel": "both"}, "channel"),
                          ({"protocol": "6class"}, "protocol"), ({"actors": 1}, "unknown option")]:
        with pytest.raises(UserError, match=match):
            ravdess.load(ravdess_root, **kwargs)
    with pytest.raises(UserError, match="Actor_XX"):
        ravdess.load(tmp_path / "nothing")


# --------------------------------------------------------------------------------------- manifest


def test_manifest_columns_paths_and_protocol(tmp_path):
    root = tmp_path / "mine"
    wav = write_wav(root / "clips" / "a.wav", seconds=0.05)
    (root / "lists").mkdir()
    (root / "lists" / "corpus.csv").write_text(
        "utt,file,transcript,feeling,fold,who,mood_score\n"
        "a,../clips/a.wav,I am so happy,joy,train,s1,2.5\n"
        "b,,,anger,valid,s2,-1\n"
        "c,/abs/c.wav,Whatever,joy,test,s3,0\n"
        "d,,unlabelled,,train,s3,\n")
    cols = {"id": "utt", "audio": "file", "text": "transcript", "label": "feeling", "split": "fold", "speaker": "who"}
    c = manifest.load(root, csv="lists/corpus.csv", columns=cols, classes="joy, anger", name="mine")
    assert c.name == "mine" and c.protocol.name == "mine-feeling" and c.protocol.classes == ["joy", "anger"]
    by_id = {u.id: u for u in c.utterances}
    assert by_id["a"].audio == str(wav.resolve()) and by_id["a"].video is None and by_id["a"].text == "I am so happy"
    assert by_id["a"].labels == {"feeling": "joy", "mood_score": "2.5"}  # other columns are kept
    assert (by_id["b"].audio, by_id["b"].text, by_id["b"].split, by_id["b"].speaker) == (None, None, "dev", "s2")
    assert by_id["c"].audio == "/abs/c.wav" and by_id["c"].split == "test"
    assert by_id["d"].split is None and "feeling" not in by_id["d"].labels
    # Another column as a regression label; the CSV given as root; classes default to sorted labels.
    reg = manifest.load(root / "lists" / "corpus.csv", columns={**cols, "label": "mood_score"}, task="regression")
    assert reg.name == "manifest" and reg.protocol.task == "regression"
    assert {u.id: u.labels.get("mood_score") for u in reg.utterances} == {"a": 2.5, "b": -1.0, "c": 0.0, "d": None}
    assert manifest.load(root, csv="lists/corpus.csv", columns=cols).protocol.classes == ["anger", "joy"]


def test_manifest_default_columns_and_errors(tmp_path):
    (tmp_path / "manifest.csv").write_text("id,audio,label,split\nx,x.wav,sad,train\nx,y.wav,sad,test\n")
    with pytest.raises(UserError, match="duplicate id x"):
        manifest.load(tmp_path)
    (tmp_path / "manifest.csv").write_text("id,audio,label,split\nx,x.wav,sad,train\ny,y.wav,calm,holdout\n")
    with pytest.raises(UserError, match="split"):
        manifest.load(tmp_path)
    (tmp_path / "manifest.csv").write_text("id,audio,label,split\nx,x.wav,sad,train\ny,y.wav,calm,test\n")
    c = load_corpus(CorpusConfig(name="manifest", root=str(tmp_path)))
    assert c.utterances[0].audio == str((tmp_path / "x.wav").resolve()) and c.protocol.classes == ["calm", "sad"]
    with pytest.raises(UserError, match="not in classes"):
        manifest.load(tmp_path, classes=["sad", "happy"])
    with pytest.raises(UserError, match="emotion"):
        manifest.load(tmp_path, columns={"label": "emotion"})
    with pytest.raises(UserError, match="role"):
        manifest.load(tmp_path, columns={"feeling": "label"})
    with pytest.raises(UserError, match="line 2"):
        manifest.load(tmp_path, task="regression")
    with pytest.raises(UserError, match="other.csv"):
        manifest.load(tmp_path, csv="other.csv")


def test_manifest_invalid_utf8_and_long_transcripts(tmp_path):
    long_text = "word " * 60_000  # 300,000 characters: over the csv module's default cell limit
    (tmp_path / "manifest.csv").write_bytes(
        b"id,text,label,split\n"
        b"ok,fine,sad,train\n"
        b"bad,caf\xe9 au lait,sad,train\n"  # a Latin-1 byte in a UTF-8 file
        + f"long,{long_text},sad,test\n".encode())
    c = manifest.load(tmp_path, name="mine")
    by_id = {u.id: u for u in c.utterances}
    assert c.name == "mine" and len(by_id["long"].text) == len(long_text.strip())
    # The broken transcript is not guessed at: the utterance stays, its text becomes a failure that
    # names the byte and the line (extraction records it; tests/test_faults.py runs one through).
    assert by_id["bad"].text is None and by_id["bad"].labels == {"label": "sad"}
    assert by_id["bad"].unusable == {"text": "transcript is not valid UTF-8 (byte 0xe9 at character 4; "
                                              "manifest.csv line 3)"}
    assert by_id["ok"].unusable == {}
    # Anywhere else (an id, a path, a label) a broken byte is an error for the whole file.
    (tmp_path / "manifest.csv").write_bytes(b"id,audio,label,split\nx,clip\xff.wav,sad,train\n")
    with pytest.raises(UserError, match=r"line 2, column audio: not valid UTF-8 \(byte 0xff at character 5\)"):
        manifest.load(tmp_path)


def test_every_reader_is_registered():
    from emofuse.corpora import READERS

    assert {"meld", "mosi", "mosei", "iemocap", "emodb", "ravdess", "manifest"} <= set(READERS)
    with pytest.raises(UserError, match="does not exist"):
        load_corpus(CorpusConfig(name="iemocap", root="/nonexistent/IEMOCAP_full_release"))
