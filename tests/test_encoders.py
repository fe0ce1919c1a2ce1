"""The frozen encoders: shapes, dims, batch invariance, agreement with the model's own forward,
chunking of long inputs, and clear errors (missing folders, empty text, no face, too short).

The hf tests build tiny random models in a temporary folder; nothing is downloaded.
"""

import numpy as np
import pytest
import soundfile as sf
import torch

from emofuse.corpora.base import Utterance
from emofuse.errors import PrepareError, UserError
from emofuse.extract import faces
from emofuse.extract.encoders.base import build_encoder, file_sha256
from emofuse.extract.encoders.chunking import chunk_spans, conv_output_length, stitch
from tests.test_media import write_mp4

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def maxdiff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def check_batch_invariance(enc, items):
    """Batched equals one at a time within float noise: masked audio is padded to the longest of
    its forward, text not at all (hf.HFEncoder._forward), and a forward of another size rounds
    differently in the last bits (matrix kernels block it differently; the CPU convolutions of
    audio too). The same batch again gives the same bits: that, with the pipeline's fixed batch
    plan, is what makes a resumed extraction bit-identical (tests/test_pipeline.py)."""
    together = enc.encode(items)
    alone = [enc.encode([it])[0] for it in items]
    for a, b in zip(together, alone):
        assert a.dtype == np.float32
        assert maxdiff(a, b) < TOL
    for a, b in zip(together, enc.encode(items)):
        np.testing.assert_array_equal(a, b)


def speech_like(seconds, sr=16000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 2 * t)
    x = np.sin(2 * np.pi * np.cumsum(f0) / sr) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def wav_utt(tmp_path, name, seconds, seed=0):
    path = tmp_path / f"{name}.wav"
    sf.write(path, speech_like(seconds, seed=seed), 16000)
    return Utterance(id=name, audio=str(path))


# ---------------------------------------------------------------------------------------------
# chunking


def test_chunk_spans_cover_and_align():
    assert chunk_spans(10, 16, 4) == [(0, 10)]
    for n, window, overlap, align in [(100, 16, 4, 1), (1000, 320, 64, 32), (97, 10, 0, 1), (33, 32, 8, 8)]:
        spans = chunk_spans(n, window, overlap, align)
        assert spans[0][0] == 0 and spans[-1][1] == n
        for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
            assert s1 % align == 0 and s1 > s0 and e0 - s1 >= overlap  # neighbours overlap enough
        assert all(window <= e - s < window + align for s, e in spans)
    with pytest.raises(ValueError):
        chunk_spans(100, 16, 16)


def test_stitch_takes_each_row_from_its_most_central_window():
    n = 100
    spans = chunk_spans(n, 30, 10)
    # piece k holds (global row, k): the stitched result says which window each row came from
    pieces = [np.stack([np.arange(s, e), np.full(e - s, k)], axis=1) for k, (s, e) in enumerate(spans)]
    out = stitch(pieces, [s for s, _ in spans], n)
    assert out[:, 0].tolist() == list(range(n))
    for row, k in out:
        s, e = spans[k]
        best = max(min(row - s0, e0 - 1 - row) for s0, e0 in spans if s0 <= row < e0)
        assert min(row - s, e - 1 - row) == best


def test_conv_output_length_matches_wav2vec2():
    kernels, strides = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
    assert conv_output_length(16000, kernels, strides) == 49
    assert conv_output_length(399, kernels, strides) == 0
    assert conv_output_length(400, kernels, strides) == 1


# ---------------------------------------------------------------------------------------------
# minilm


@pytest.fixture(scope="module")
def minilm():
    return build_encoder("text", {"backend": "minilm"})


def owned(spans):
    """[lo, hi) of the rows each window gives to the stitched output: cuts in the middle of overlaps."""
    cuts = [(s1 + e0) // 2 for (_, e0), (s1, _) in zip(spans, spans[1:])]
    return list(zip([spans[0][0]] + cuts, cuts + [spans[-1][1]]))


def check_windows(enc, ids, out):
    """Each stitched row of a text equals the forward of the window it was taken from."""
    spans = enc._spans(len(ids))
    assert len(spans) >= 2
    own = [enc._forward([enc._window_input(ids[s:e])])[0] for s, e in spans]
    n_front, n_back = len(enc.prefix), len(enc.suffix)
    for (lo, hi), (s, _), o in zip(owned(spans), spans, own):
        assert maxdiff(out[n_front + lo : n_front + hi], o[n_front + lo - s : n_front + hi - s]) < TOL
    assert maxdiff(out[:n_front], own[0][:n_front]) < TOL  # [CLS] from the first window
    assert maxdiff(out[len(out) - n_back :], own[-1][len(own[-1]) - n_back :]) < TOL  # [SEP] from the last


def test_minilm_shapes_batching_and_reference(minilm):
    assert minilm.modality == "text" and minilm.dim == 384 and minilm.fps is None
    texts = ["Hello there, how are you?", "I am so angry right now that I could scream!", "ok"]
    items = [minilm.prepare(Utterance(id=str(i), text=t)) for i, t in enumerate(texts)]
    outs = minilm.encode(items)
    for it, out in zip(items, outs):
        assert out.shape == (len(it) + 2, 384)  # [CLS] tokens [SEP]
        assert minilm.size(it) == len(it) + 2
    check_batch_invariance(minilm, items)

    tok = minilm.tokenizer(texts[1], return_tensors="pt")
    with torch.inference_mode():
        ref = minilm.model(**tok).last_hidden_state[0].numpy()
    assert maxdiff(outs[1], ref) < TOL


def test_text_is_not_padded(minilm):
    """A text forward holds inputs of exactly one length (windows of long texts included) and pads
    nothing; several texts of one length share it, and agree with their unbatched selves within
    float noise (not bit for bit: see check_batch_invariance)."""
    texts = ["I am happy about the game.", "I am sad about the news.", "We are late.", "ok",
             "I am angry about the exam really.", " ".join(["words and more words"] * 120)]
    items = [minilm.prepare(Utterance(id=str(i), text=t)) for i, t in enumerate(texts)]
    assert len(items[0]) == len(items[1]) and len(minilm._spans(len(items[-1]))) >= 2
    windows = [e - s + minilm.n_special for it in items for s, e in minilm._spans(len(it))]
    forwards = []
    forward = minilm._forward_padded
    minilm._forward_padded = lambda inputs, n: forwards.append(([len(x) for x in inputs], n)) or forward(inputs, n)
    try:
        minilm.encode(items)
    finally:
        del minilm._forward_padded
    assert all(set(lengths) == {n} for lengths, n in forwards), forwards  # one length, padded to itself
    assert sorted(n for lengths, n in forwards) == sorted(set(windows))  # one forward per length
    assert sorted(x for lengths, _ in forwards for x in lengths) == sorted(windows)
    check_batch_invariance(minilm, items)


def test_minilm_long_text_is_chunked_not_truncated(minilm):
    text = " ".join(f"sentence {i} says something rather different." for i in range(80))
    ids = minilm.prepare(Utterance(id="long", text=text))
    assert len(ids) > 2 * minilm.max_tokens
    out = minilm.encode([ids])[0]
    assert out.shape == (len(ids) + 2, 384) and np.isfinite(out).all()
    check_windows(minilm, ids, out)
    short = minilm.prepare(Utterance(id="s", text="short one"))
    check_batch_invariance(minilm, [ids, short])


def test_many_windows_run_a_few_at_a_time(minilm, monkeypatch):
    """A transcript cut into many windows is run in forwards of at most FORWARD_BUDGET tokens (memory
    of an ordinary batch, not of the whole transcript), with the same result as one forward."""
    from emofuse.extract.encoders import hf

    text = " ".join(f"sentence {i} says something rather different." for i in range(200))
    ids = minilm.prepare(Utterance(id="long", text=text))
    assert len(minilm._spans(len(ids))) >= 8
    one_forward = minilm.encode([ids])[0]
    sizes = []
    forward = minilm._forward_padded
    monkeypatch.setattr(minilm, "_forward_padded", lambda inputs, n: sizes.append(len(inputs)) or forward(inputs, n))
    monkeypatch.setitem(hf.FORWARD_BUDGET, "text", 2 * minilm.max_tokens)
    split = minilm.encode([ids])[0]
    assert max(sizes) == 2 and sum(sizes) == len(minilm._spans(len(ids)))
    assert maxdiff(split, one_forward) < TOL
    assert hf._split_by_budget([0, 1, 2, 3], [5, 9, 3, 30], 20) == [[0, 1], [2], [3]]


def test_minilm_spec_and_errors(minilm):
    spec = minilm.full_spec()
    assert spec["backend"] == "minilm" and spec["layer"] == -1 and spec["max_tokens"] == 256
    assert spec["padding"] == "exact"  # the text padding policy is in the fingerprint (hf.TEXT_PADDING)
    assert "path" not in spec  # the venv path differs between machines
    assert list(spec["checkpoint_sha256"].values())[0] == file_sha256(minilm.folder / "model.safetensors")
    for text in ["", "   \n ", None]:
        with pytest.raises(PrepareError) as e:
            minilm.prepare(Utterance(id="e", text=text))
        assert e.value.stage == "text" and e.value.reason == "empty transcript"
    with pytest.raises(UserError):
        build_encoder("text", {"backend": "minilm", "layer": 9})


# ---------------------------------------------------------------------------------------------
# opensmile


def test_opensmile_egemaps(tmp_path):
    enc = build_encoder("audio", {"backend": "opensmile"})
    assert enc.modality == "audio" and enc.dim == 25 and enc.fps == 100
    utts = [wav_utt(tmp_path, "a", 1.0), wav_utt(tmp_path, "b", 2.5, seed=1)]
    items = [enc.prepare(u) for u in utts]
    outs = enc.encode(items)
    for out, seconds in zip(outs, [1.0, 2.5]):
        assert out.dtype == np.float32 and out.shape[1] == 25
        assert abs(out.shape[0] - seconds * 100) <= 6  # 10 ms hop, minus the analysis window
        assert np.isfinite(out).all()
    check_batch_invariance(enc, items)
    assert enc.full_spec()["feature_set"] == "eGeMAPSv02"

    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(16000, np.float32), 16000)
    assert np.isfinite(enc.encode([enc.prepare(Utterance(id="s", audio=str(silence)))])[0]).all()

    tiny = tmp_path / "tiny.wav"
    sf.write(tiny, speech_like(0.02), 16000)
    with pytest.raises(PrepareError) as e:
        enc.prepare(Utterance(id="t", audio=str(tiny)))
    assert e.value.stage == "audio" and "too short" in e.value.reason


@pytest.mark.parametrize("feature_set", ["eGeMAPSv02", "ComParE_2016"])
def test_opensmile_long_input_in_windows_equals_one_pass(tmp_path, feature_set):
    """Long inputs are processed in overlapping windows (bounded memory) and give what one pass over
    the whole input gives: bit for bit for eGeMAPS, within float32 noise for ComParE."""
    rng = np.random.default_rng(1)
    # 40 s of speech-like voiced stretches (0.2-1.5 s) and pauses, so window edges fall in both
    parts = [[speech_like(rng.uniform(0.2, 1.5), seed=k), np.zeros(int(rng.uniform(0.05, 0.4) * 16000), np.float32)]
             for k in range(80)]
    x = np.concatenate(sum(parts, []))[: 40 * 16000]
    path = tmp_path / "long.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    utt = Utterance(id="long", audio=str(path))
    enc = build_encoder("audio", {"backend": "opensmile", "feature_set": feature_set})
    enc.chunk_seconds = 1000.0  # one pass
    whole = enc.prepare(utt)
    enc.chunk_seconds = 12.0  # 4 windows overlapping by 5 s
    cut = enc.prepare(utt)
    assert cut.shape == whole.shape and len(whole) > 3900
    if feature_set == "eGeMAPSv02":
        np.testing.assert_array_equal(cut, whole)
    else:
        np.testing.assert_allclose(cut, whole, rtol=1e-5, atol=1e-4)  # measured: 1.4e-6 relative at most


def test_opensmile_compare_and_cut(tmp_path):
    enc = build_encoder("audio", {"backend": "opensmile", "feature_set": "ComParE_2016"})
    assert enc.dim == 65
    u = wav_utt(tmp_path, "a", 3.0)
    u.start, u.end = 1.0, 2.0
    out = enc.encode([enc.prepare(u)])[0]
    assert out.shape[1] == 65 and abs(out.shape[0] - 100) <= 6
    with pytest.raises(UserError):
        build_encoder("audio", {"backend": "opensmile", "feature_set": "NoSuchSet"})


# ---------------------------------------------------------------------------------------------
# dlib faces


@pytest.fixture(scope="module")
def face_video(tmp_path_factory):
    """2 s at 25 fps of the astronaut's face (256x256), moving a little; with audio."""
    from skimage import data

    img = data.astronaut()[40:296, 96:352]  # the face is ~90 px wide in this crop
    frames = np.stack([np.roll(img, i, axis=1) for i in range(50)])
    path = tmp_path_factory.mktemp("video") / "face.mp4"
    write_mp4(path, frames, fps=25, audio=speech_like(2.0))
    return str(path)


@pytest.fixture(scope="module")
def dlib_enc():
    return build_encoder("video", {"backend": "dlib"})


def test_dlib_face_features(dlib_enc, face_video):
    enc = dlib_enc
    assert enc.modality == "video" and enc.dim == 264 and enc.fps == 5.0
    item = enc.prepare(Utterance(id="f", video=face_video))
    assert item["landmarks"].shape == (10, 136) and item["chips"].shape == (10, 150, 150, 3)
    assert enc.size(item) == 10
    out = enc.encode([item])[0]
    assert out.shape == (10, 264) and out.dtype == np.float32 and np.isfinite(out).all()
    # landmarks: centred, eye distance 1; descriptor: dlib's unit-scale 128-d embedding
    pts = out[0, :136].reshape(68, 2)
    assert np.abs(pts.mean(axis=0)).max() < 1e-4
    assert abs(np.linalg.norm(pts[42:48].mean(0) - pts[36:42].mean(0)) - 1) < 1e-4
    assert 0.5 < np.linalg.norm(out[0, 136:]) < 2.0
    # the same face in every frame: descriptors agree
    assert np.linalg.norm(out[:, 136:] - out[0, 136:], axis=1).max() < 0.2

    clip = enc.prepare(Utterance(id="c", video=face_video, start=0.5, end=1.5))
    assert enc.size(clip) == 5
    check_batch_invariance(enc, [item, clip])
    spec = enc.full_spec()
    assert spec["fps"] == 5.0 and len(spec["checkpoint_sha256"]) == 2


def test_dlib_descriptor_every_k_frames(dlib_enc, face_video):
    sparse = build_encoder("video", {"backend": "dlib", "descriptor_every": 4})
    item = dlib_enc.prepare(Utterance(id="f", video=face_video))
    full, thin = dlib_enc.encode([item])[0], sparse.encode([item])[0]
    assert thin.shape == full.shape == (10, 264)
    np.testing.assert_array_equal(thin[:, :136], full[:, :136])  # landmarks untouched
    for i in range(10):  # frame i holds the descriptor computed on frame i - i % 4
        np.testing.assert_allclose(thin[i, 136:], full[i - i % 4, 136:], atol=1e-6)
    assert sparse.full_spec()["descriptor_every"] == 4 and sparse.full_spec() != dlib_enc.full_spec()


def test_dlib_no_face_is_a_face_failure(dlib_enc, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (10, 128, 128, 3), dtype=np.uint8)
    path = tmp_path / "noise.mp4"
    write_mp4(path, noise, fps=10)
    with pytest.raises(PrepareError) as e:
        dlib_enc.prepare(Utterance(id="n", video=str(path)))
    assert e.value.stage == "face" and "no face found in 5 frames" in e.value.reason
    with pytest.raises(PrepareError) as e:
        dlib_enc.prepare(Utterance(id="v", video=None))
    assert e.value.stage == "decode"


def test_haar_detector_finds_the_face(face_video):
    from emofuse.extract.media import load_video_frames

    frames = load_video_frames(face_video, fps=2)
    keep, haar = faces.face_frames(frames, detector="haar")
    assert len(keep) == len(frames)
    _, hog = faces.face_frames(frames, detector="dlib")
    for a, b in zip(haar, hog):  # both detectors put the box on the same face
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        assert inter / (faces._area(a) + faces._area(b) - inter) > 0.4


def test_tracking_follows_the_same_face(monkeypatch):
    A, B = (100, 100, 200, 200), (10, 10, 60, 60)
    near_a, near_b = (105, 102, 205, 202), (12, 10, 62, 60)
    script = [[B, A], [near_b, near_a], [], [], [], [near_b]]
    calls = iter(script)
    monkeypatch.setattr(faces, "detect_faces", lambda frame, detector, upsample: next(calls))
    boxes = faces.track_faces(np.zeros((6, 8, 8, 3), np.uint8), max_gap=2)
    # largest first; then the closest to it; held for 2 empty frames; dropped; then a new face
    assert boxes == [A, near_a, near_a, near_a, None, near_b]


# ---------------------------------------------------------------------------------------------
# hf: tiny random models in a local folder


def tiny_wav2vec2(folder, norm="layer", stable=False):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm=norm, do_stable_layer_norm=stable, vocab_size=10,
    )  # fmt: skip
    Wav2Vec2Model(cfg).save_pretrained(folder)
    fe = Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=norm == "layer")
    fe.save_pretrained(folder)
    return str(folder)


def tiny_text_model(folder, kind="bert"):
    from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

    from emofuse.extract.encoders.minilm import model_dir

    torch.manual_seed(0)
    sizes = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "bert":
        model = BertModel(BertConfig(max_position_embeddings=512, **sizes))
    else:  # RoBERTa positions start after the padding index; BERT's vocabulary pads with 0
        model = RobertaModel(RobertaConfig(max_position_embeddings=514, pad_token_id=0, **sizes))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir(), local_files_only=True).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "w2v_layer": tiny_wav2vec2(root / "w2v_layer", "layer"),
        "w2v_stable": tiny_wav2vec2(root / "w2v_stable", "layer", stable=True),
        "w2v_group": tiny_wav2vec2(root / "w2v_group", "group"),
        "bert": tiny_text_model(root / "bert", "bert"),
        "roberta": tiny_text_model(root / "roberta", "roberta"),
    }


def reference_audio_forward(enc, item):
    """transformers' own forward on one unpadded input: a fresh model from the same folder (enc's
    runs its convs through conv_features.ChannelsLastFeatureEncoder)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(enc.folder, local_files_only=True).eval()
    with torch.inference_mode():
        return model(torch.from_numpy(item)[None], output_hidden_states=True)


@pytest.mark.parametrize("variant", ["w2v_layer", "w2v_stable", "w2v_group"])
def test_hf_audio(tiny, tmp_path, variant):
    from emofuse.extract.encoders import hf

    enc = build_encoder("audio", {"backend": "hf", "path": tiny[variant]})  # modality read from the config
    assert enc.modality == "audio" and enc.dim == 32 and enc.fps == 50.0
    assert enc.masked  # group norm too: ours normalises each input over its own samples
    # 0.45 s shares the padded length of 0.5 s (multiples of 0.25 s): padded in their batch
    utts = [wav_utt(tmp_path, f"u{i}", s, seed=i) for i, s in enumerate([0.5, 0.83, 1.2, 0.45])]
    items = [enc.prepare(u) for u in utts]
    outs = enc.encode(items)
    for it, out in zip(items, outs):
        assert out.shape == (conv_output_length(len(it), enc.kernels, enc.strides), 32)
        ref = reference_audio_forward(enc, it).last_hidden_state[0].numpy()
        assert maxdiff(out, ref) < TOL
    check_batch_invariance(enc, items)

    spec = enc.full_spec()
    assert spec["checkpoint_sha256"] == {"model.safetensors": file_sha256(f"{tiny[variant]}/model.safetensors")}
    assert spec["sample_rate"] == 16000 and spec["layer"] == -1 and spec["dtype"] == "float32"
    assert spec["padding"] == hf.AUDIO_PADDING  # padded to the longest of each forward: in the fingerprint
    assert spec["feature_encoder"] == "channels-last-matmul, tiles of 256 frames"


def test_masked_audio_batch_is_one_forward_padded_to_its_longest(tiny, tmp_path, monkeypatch):
    """A batch of clips of similar lengths runs as one forward, padded to its longest rounded up to
    0.25 s, however large the pipeline's budget made it (a GPU wants few, large forwards):
    FORWARD_BUDGET only splits off what windows of long inputs add. A clip that would make the
    forward more than MAX_PADDING (10%) padding gets a forward of its own."""
    from emofuse.extract.encoders import hf

    enc = build_encoder("audio", {"backend": "hf", "path": tiny["w2v_group"]})
    seconds = [2.45, 0.5, 2.4, 2.47, 2.42]
    items = [enc.prepare(wav_utt(tmp_path, f"u{i}", s, seed=i)) for i, s in enumerate(seconds)]
    forwards = []
    inner = enc._forward_padded
    monkeypatch.setattr(enc, "_forward_padded", lambda inputs, n: forwards.append(([len(x) for x in inputs], n)) or inner(inputs, n))
    monkeypatch.setitem(hf.FORWARD_BUDGET, "audio", 16000)  # below the batch's padded size
    outs = enc.encode(items)
    lengths = sorted(len(x) for x in items)  # shortest first
    assert forwards == [(lengths[:1], 8000), (lengths[1:], 40000)]  # 0.5 s alone; 2.47 s -> 2.5 s
    for it, out in zip(items, outs):
        assert maxdiff(out, reference_audio_forward(enc, it).last_hidden_state[0].numpy()) < TOL
    assert hf._split_by_budget([0, 1, 2], [10, 10, 10], 100, real=[10, 9, 4], max_padding=0.2) == [[0, 1], [2]]


def test_hf_audio_layers_and_chunking(tiny, tmp_path):
    path = tiny["w2v_layer"]
    u = wav_utt(tmp_path, "long", 3.3)
    every = build_encoder("audio", {"backend": "hf", "path": path, "layer": "all"})
    item = every.prepare(u)
    all_layers = every.encode([item])[0]
    n_frames = conv_output_length(len(item), every.kernels, every.strides)
    assert all_layers.shape == (n_frames, 3, 32)
    ref = reference_audio_forward(every, item)
    for layer in range(2):
        assert maxdiff(all_layers[:, layer], ref.hidden_states[layer][0].numpy()) < TOL

    # Windows of 1 s sharing 0.6 s: the cut is 0.3 s (15 frames) inside each window. Layer 0 only
    # sees +-8 frames (the positional conv), so the stitched output equals the plain forward
    # everywhere; the last layer sees the whole window, so each row equals its own window's forward.
    chunked0 = build_encoder("audio", {"backend": "hf", "path": path, "layer": 0, "chunk_seconds": 1.0, "overlap_seconds": 0.6})
    spans = chunked0._spans(len(item))
    assert len(spans) >= 3
    out0 = chunked0.encode([item])[0]
    assert maxdiff(out0, all_layers[:, 0]) < TOL

    chunked = build_encoder("audio", {"backend": "hf", "path": path, "chunk_seconds": 1.0, "overlap_seconds": 0.6})
    out = chunked.encode([item])[0]
    assert out.shape == (n_frames, 32)
    own = [chunked._forward([item[s:e]])[0] for s, e in spans]
    frame_spans = [(s // chunked.hop, s // chunked.hop + len(o)) for (s, _), o in zip(spans, own)]
    for (lo, hi), (f0, _), o in zip(owned(frame_spans), frame_spans, own):
        assert maxdiff(out[lo:hi], o[lo - f0 : hi - f0]) < TOL
    short = wav_utt(tmp_path, "short", 0.7)
    check_batch_invariance(chunked, [item, chunked.prepare(short)])


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_hf_text(tiny, kind):
    enc = build_encoder("text", {"backend": "hf", "path": tiny[kind], "max_tokens": 16, "overlap": 4})
    assert enc.modality == "text" and enc.dim == 32 and enc.fps is None
    texts = ["a short one", "a much longer text, with many more words in it than fit into one window of fourteen tokens, "
             "so that it has to be cut into several overlapping windows and stitched back together", "yes"]
    items = [enc.prepare(Utterance(id=str(i), text=t)) for i, t in enumerate(texts)]
    outs = enc.encode(items)
    for it, out in zip(items, outs):
        assert out.shape == (len(it) + 2, 32)
    check_batch_invariance(enc, items)

    # a single window is exactly the model's own forward
    tok = enc.tokenizer(texts[0], return_tensors="pt")
    with torch.inference_mode():
        ref = enc.model(input_ids=tok["input_ids"]).last_hidden_state[0].numpy()
    assert maxdiff(outs[0], ref) < TOL

    # long text: 14-token windows, stitched; every row from its own window's forward
    long_ids = items[1]
    assert len(long_ids) > 2 * 14
    check_windows(enc, long_ids, outs[1])


def test_hf_bfloat16_is_close(tiny, tmp_path):
    u = wav_utt(tmp_path, "a", 1.0)
    f32 = build_encoder("audio", {"backend": "hf", "path": tiny["w2v_layer"]})
    bf16 = build_encoder("audio", {"backend": "hf", "path": tiny["w2v_layer"], "dtype": "bfloat16"})
    a = f32.encode([f32.prepare(u)])[0]
    b = bf16.encode([bf16.prepare(u)])[0]
    assert b.dtype == np.float32 and b.shape == a.shape
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05
    assert bf16.full_spec()["dtype"] == "bfloat16"


@pytest.mark.parametrize("name, modality", [("w2v_layer", "audio"), ("bert", "text")])
def test_hf_precast_weights_equal_plain_autocast(tiny, tmp_path, monkeypatch, name, modality):
    """bf16 weights stored once give exactly what autocast gives when it casts them every forward
    (with F.linear: packed linears are another kernel, tested below)."""
    from emofuse.extract.encoders import hf
    from emofuse.extract.encoders.hf import precast_for_autocast

    monkeypatch.setattr(hf, "onednn_packing_works", lambda: False)
    enc = build_encoder(modality, {"backend": "hf", "path": tiny[name], "dtype": "bfloat16"})
    assert any(p.dtype == torch.bfloat16 for p in enc.model.parameters())
    u = wav_utt(tmp_path, "a", 1.0) if modality == "audio" else Utterance(id="t", text="a short test sentence")
    precast = enc.encode([enc.prepare(u)])[0]
    enc.model.float()  # back to float32 weights: autocast casts them on every call, as before
    assert all(p.dtype == torch.float32 for p in enc.model.parameters())
    plain = enc.encode([enc.prepare(u)])[0]
    np.testing.assert_array_equal(precast, plain)
    assert precast_for_autocast(enc.model, torch.bfloat16) > 0


def skip_without_onednn_bf16():
    # The platform, not onednn_packing_works(): a broken PackedLinear must fail these tests, not skip them.
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("this torch build or CPU has no oneDNN bf16 matmul")


def test_packed_linear_equals_autocast_linear_to_bf16_rounding():
    from emofuse.extract.encoders.hf import PackedLinear

    skip_without_onednn_bf16()
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200).requires_grad_(False)
    x = torch.randn(3, 37, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = linear(x)
    linear.to(torch.bfloat16)
    got = PackedLinear(linear)(x)  # a float32 input, cast as autocast casts it
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got, want)  # bf16 tolerances: a last-bit difference at most here
    assert (got != want).float().mean() < 0.05

    # with the feed-forward block's GELU fused: the exact (erf) GELU of the float32 sums, rounded once
    packed = PackedLinear(linear)
    packed.activation = "gelu"
    got = packed(x)
    exact = torch.nn.functional.gelu(x.bfloat16().float() @ linear.weight.float().T + linear.bias.float())
    torch.testing.assert_close(got, exact.bfloat16())
    sums = x.bfloat16().float() @ linear.weight.float().T + linear.bias.float()
    tanh = torch.nn.functional.gelu(sums, approximate="tanh").bfloat16()
    # measured: 0.005% of the values differ in the last bit (the sums' order), 2.7% from the tanh GELU
    assert (got != exact.bfloat16()).float().mean() < 0.1 * (got != tanh).float().mean()


@pytest.mark.parametrize("name, modality", [("w2v_layer", "audio"), ("bert", "text")])
def test_hf_bf16_on_cpu_packs_linears_as_accurately_as_autocast(tiny, tmp_path, monkeypatch, name, modality):
    """A bf16 encoder on a CPU runs its Linear layers with oneDNN-packed weights; against float32
    it is as close as the same model with autocast's F.linear, and its spec says which ran."""
    from emofuse.extract.encoders import hf

    skip_without_onednn_bf16()
    u = wav_utt(tmp_path, "a", 1.0) if modality == "audio" else Utterance(id="t", text="a short test sentence")

    def encode(**options):
        enc = build_encoder(modality, {"backend": "hf", "path": tiny[name], **options})
        return enc, enc.encode([enc.prepare(u)])[0]

    _, exact = encode()
    packed_enc, packed = encode(dtype="bfloat16")
    monkeypatch.setattr(hf, "onednn_packing_works", lambda: False)
    plain_enc, plain = encode(dtype="bfloat16")
    assert sum(isinstance(m, hf.PackedLinear) for m in packed_enc.model.modules()) > 0
    assert not any(isinstance(m, hf.PackedLinear) for m in plain_enc.model.modules())
    assert packed_enc.full_spec()["linear_kernel"] == "onednn-packed, fused GELU"
    assert plain_enc.full_spec()["linear_kernel"] == "aten"
    # audio's self-attention runs packed too (hf.PackedSelfAttention), which the spec says; text's is transformers'
    packed_attention = sum(isinstance(m, hf.PackedSelfAttention) for m in packed_enc.model.modules())
    assert packed_attention == (packed_enc.model.config.num_hidden_layers if modality == "audio" else 0)
    assert packed_enc.full_spec().get("attention") == (hf.PACKED_ATTENTION if modality == "audio" else None)
    assert "attention" not in plain_enc.full_spec()
    layers = packed_enc.model.config.num_hidden_layers
    assert sum(getattr(m, "activation", "") == "gelu" for m in packed_enc.model.modules()) == layers
    # the feed-forward blocks' separate GELUs are gone (the positional conv keeps its own)
    assert not any(hf.is_exact_gelu(getattr(m, "intermediate_act_fn", None)) for m in packed_enc.model.modules())

    def error(x):
        return np.linalg.norm(x - exact) / np.linalg.norm(exact)

    assert 0 < error(packed) < 0.05
    assert error(packed) < 1.5 * error(plain)


def test_weight_norm_is_computed_once_with_the_same_result(tiny, tmp_path):
    """The positional conv's weight norm is folded into a plain weight when an hf encoder loads:
    the same outputs, bit for bit, in float32 and under bf16 autocast."""
    from torch.nn.utils import parametrize
    from transformers import AutoModel

    from emofuse.extract.encoders.hf import freeze_weight_norm

    x = torch.from_numpy(speech_like(0.8))[None]
    model = AutoModel.from_pretrained(tiny["w2v_layer"], local_files_only=True).eval()
    assert parametrize.is_parametrized(model.encoder.pos_conv_embed.conv)
    with torch.inference_mode():
        before = model(x).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before16 = model(x).last_hidden_state
        assert freeze_weight_norm(model) == 1
        assert not any(parametrize.is_parametrized(m) for m in model.modules())
        torch.testing.assert_close(model(x).last_hidden_state, before, rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(model(x).last_hidden_state, before16, rtol=0, atol=0)
    enc = build_encoder("audio", {"backend": "hf", "path": tiny["w2v_layer"], "dtype": "bfloat16"})
    assert enc.model.encoder.pos_conv_embed.conv.weight.dtype == torch.bfloat16  # then precast like the rest
    assert not any(p.requires_grad for p in enc.model.parameters())


def audio_models():
    """Tiny random models of every wav2vec2-style family transformers has, both conv norms."""
    from transformers import (Data2VecAudioConfig, Data2VecAudioModel, HubertConfig, HubertModel, Wav2Vec2Config,
                              Wav2Vec2Model, WavLMConfig, WavLMModel)

    sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7,
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=10)
    torch.manual_seed(0)
    yield "wav2vec2-group", Wav2Vec2Model(Wav2Vec2Config(feat_extract_norm="group", **sizes))
    yield "wav2vec2-layer-bias", Wav2Vec2Model(Wav2Vec2Config(feat_extract_norm="layer", conv_bias=True, **sizes))
    yield "hubert-group", HubertModel(HubertConfig(feat_extract_norm="group", **sizes))
    yield "wavlm-layer", WavLMModel(WavLMConfig(feat_extract_norm="layer", **sizes))
    yield "data2vec-audio", Data2VecAudioModel(Data2VecAudioConfig(**sizes))  # layer norm in every conv layer


@pytest.mark.parametrize("groups", ["one per channel", "one of all channels"])
def test_group_norm_folded_into_the_first_conv_equals_torch(groups):
    """channel_norm computes GroupNorm(conv(x)) as one matmul with scaled weights, from the statistics
    of the conv's windows: per channel (wav2vec2's first layer) or pooled over all channels
    (wav2vec 1.0's). In float32 it equals conv1d + group_norm; the input's offset spreads the channel
    means apart, which the pooled variance must count, and only the first n samples are the input's."""
    from emofuse.extract.encoders.conv_features import channel_norm, flat_weight

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(1, 24, kernel_size=10, stride=5, bias=groups == "one of all channels").requires_grad_(False)
    norm = torch.nn.GroupNorm(24 if groups == "one per channel" else 1, 24).requires_grad_(False)
    norm.weight.uniform_(0.5, 1.5)
    norm.bias.normal_()
    x = torch.randn(4000) * 0.3 + 0.8
    n = 3210  # the rest stands for padding, which must not count
    want = torch.nn.functional.group_norm(conv(x[None, None, :n]), norm.num_groups, norm.weight, norm.bias, norm.eps)[0].T
    got = channel_norm(x[:, None], n, conv, flat_weight(conv), norm)(x[:n, None])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_channels_last_feature_encoder_equals_transformers():
    """Every conv as one matmul, channels last, and the first layer's GroupNorm folded into it,
    equal transformers' convolutions in float32 (a batch of two, with a DC offset in one input so
    that the norm's mean matters), whole or in tiles of a few frames. In bf16 it is no further
    from float32 than transformers' own forward under autocast."""
    from emofuse.extract.encoders.conv_features import ChannelsLastFeatureEncoder, use_channels_last_feature_encoder
    from emofuse.extract.encoders.hf import precast_for_autocast

    x = torch.from_numpy(np.stack([speech_like(0.7, seed=1), speech_like(0.7, seed=2) + 0.5]))
    for name, model in audio_models():
        model.eval()
        original = model.feature_extractor
        with torch.inference_mode():
            ref = original(x)
            assert use_channels_last_feature_encoder(model), name
            assert isinstance(model.feature_extractor, ChannelsLastFeatureEncoder)
            got = model.feature_extractor(x)
            assert got.shape == ref.shape and got.dtype == torch.float32
            assert maxdiff(got.numpy(), ref.numpy()) < TOL, name
            # in tiles of 5 of its 34 frames (the last one shorter), and whole (on a GPU): the same frames
            tiled = ChannelsLastFeatureEncoder(original, tile_frames=5)(x)
            assert maxdiff(tiled.numpy(), ref.numpy()) < TOL, name
            whole = ChannelsLastFeatureEncoder(original, tile_frames=None)
            assert maxdiff(whole(x).numpy(), ref.numpy()) < TOL and whole.name == "channels-last-matmul, whole inputs"

            precast_for_autocast(model, torch.bfloat16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref16 = original(x).float()
                got16 = ChannelsLastFeatureEncoder(original)(x).float()  # bf16 weights copied now
            error = lambda a: float(torch.linalg.norm(a - ref) / torch.linalg.norm(ref))  # noqa: E731
            assert error(got16) < 1.1 * error(ref16), name  # here: 0.6-1.6% against autocast's 0.6-2.5%


def test_grouped_convs_stay_float32_under_autocast():
    """What prepare_frozen does for a GPU in bf16: every grouped Conv1d (the positional convs) runs
    in float32 outside autocast, and gives the float32 conv's result exactly; the model's forward
    is then no further from float32 than under plain autocast (run here on the CPU)."""
    import copy

    from emofuse.extract.encoders.hf import Float32Conv1d, prepare_frozen

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(16, 16, 9, padding=4, groups=4)
    x = torch.randn(2, 16, 30).bfloat16()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = Float32Conv1d(conv)(x)
    with torch.inference_mode():
        assert got.dtype == torch.float32 and torch.equal(got, conv(x.float()))

    wav = torch.from_numpy(np.stack([speech_like(0.7, seed=1), speech_like(0.7, seed=2)]))
    for name, model in audio_models():
        model.eval()
        with torch.inference_mode():
            ref = model(wav).last_hidden_state
            with torch.autocast("cpu", dtype=torch.bfloat16):
                plain = model(wav).last_hidden_state.float()
            gpu_like = copy.deepcopy(model)
            kernel, float32_convs = prepare_frozen(gpu_like, torch.bfloat16, "cuda")
            assert kernel == "aten" and float32_convs >= 1, name  # data2vec-audio: a stack of them
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours = gpu_like(wav).last_hidden_state.float()
        error = lambda a: float(torch.linalg.norm(a - ref) / torch.linalg.norm(ref))  # noqa: E731
        assert error(ours) < 1.1 * error(plain), name


def test_grouped_convs_run_channels_last_on_a_cpu_bit_for_bit(monkeypatch):
    """What prepare_frozen does on a CPU in bf16: every grouped Conv1d (the positional convs) runs as
    a channels-last 2-D conv over a time axis padded to outputs of a multiple of 64 frames, and gives
    the conv's own outputs bit for bit, at lengths on both sides of that multiple; so does each
    wav2vec2-style model's forward."""
    from emofuse.extract.encoders import hf

    skip_without_onednn_bf16()
    torch.manual_seed(0)
    # (48 channels in 4 groups of 12 is avoided: torch 2.13's own bf16 conv computes it wrongly on this CPU)
    for channels, kernel, groups, stride in [(64, 16, 4, 1), (32, 19, 16, 1), (24, 9, 2, 2)]:
        conv = torch.nn.Conv1d(channels, channels, kernel, stride=stride, padding=kernel // 2, groups=groups)
        conv = conv.bfloat16().requires_grad_(False)
        for frames in (1, 2, 7, 63, 64, 65, 130):
            x = torch.randn(3, frames, channels).bfloat16().transpose(1, 2)  # the (B, C, T) view models give it
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                want, got = conv(x), hf.ChannelsLastConv1d(conv)(x)
            assert got.shape == want.shape and torch.equal(got, want), (channels, kernel, stride, frames)
            exact = torch.nn.functional.conv1d(x.float(), conv.weight.float(), conv.bias.float(), stride, kernel // 2,
                                               groups=groups)
            torch.testing.assert_close(got.float(), exact, rtol=0.02, atol=0.05)

    wav = torch.from_numpy(np.stack([speech_like(0.7, seed=1), speech_like(0.7, seed=2)]))
    for (name, ours), (_, theirs) in zip(list(audio_models()), list(audio_models())):  # the same random weights
        ours.eval(), theirs.eval()
        hf.prepare_frozen(ours, torch.bfloat16, "cpu")
        with monkeypatch.context() as m:
            m.setattr(hf, "channels_last_grouped_convs", lambda model: 0)
            hf.prepare_frozen(theirs, torch.bfloat16, "cpu")
        assert any(isinstance(m, hf.ChannelsLastConv1d) for m in ours.modules()), name
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ours(wav).last_hidden_state, theirs(wav).last_hidden_state), name


def test_padding_lengths_reads_only_padding_masks():
    from emofuse.extract.encoders.hf import padding_lengths

    lengths = torch.tensor([5, 3, 4])
    keys = torch.arange(5) < lengths[:, None]  # (B, T)
    square = keys[:, None, None, :].expand(3, 1, 5, 5)
    assert padding_lengths(square, 5) == [5, 3, 4]
    assert padding_lengths(keys[:, None, None, :], 5) == [5, 3, 4]  # broadcast over queries
    additive = torch.zeros(3, 1, 5, 5).masked_fill(~square, torch.finfo(torch.float32).min)
    assert padding_lengths(additive, 5) == [5, 3, 4]
    causal = torch.ones(5, 5, dtype=torch.bool).tril().expand(3, 1, 5, 5)
    assert padding_lengths(causal, 5) is None
    assert padding_lengths(None, 5) is None
    assert padding_lengths(square, 6) is None


def test_packed_self_attention_equals_transformers_on_padded_batches():
    """On a CPU in bf16 the wav2vec2-style self-attention (wav2vec2, HuBERT, data2vec-audio; not
    WavLM's, which adds a position bias) runs as PackedSelfAttention: one packed q/k/v projection,
    keys zero-padded to a multiple of 16 frames and masked. On a padded, masked batch each input's
    frames agree with transformers' own attention to bf16 rounding, alone and through the model;
    with a mask that is not padding (causal) it computes what transformers does."""
    from transformers.masking_utils import create_bidirectional_mask

    from emofuse.extract.encoders import hf

    skip_without_onednn_bf16()

    def assert_near(got, want, what):  # bf16 rounding: a few 0.4% steps, relative to the outputs' scale
        got, want = got.float(), want.float()
        assert float((got - want).abs().max()) < 0.03 * float(want.abs().max()), what

    wav = torch.zeros(2, 11200)
    wav[0] = torch.from_numpy(speech_like(0.7, seed=1))
    wav[1, :8000] = torch.from_numpy(speech_like(0.5, seed=2))
    mask = torch.zeros(2, 11200, dtype=torch.long)
    mask[0], mask[1, :8000] = 1, 1
    for (name, model), (_, ours) in zip(list(audio_models()), list(audio_models())):  # the same random weights
        for m in (model, ours):
            # attention weights of unit gain (the models' init, std 0.02, leaves attention a rounding
            # error of the residual stream, which no test of it could see)
            torch.manual_seed(1)
            for p in m.encoder.layers[0].attention.parameters():
                p.data.normal_(0, m.config.hidden_size ** -0.5)
            m.eval()
            hf.prepare_frozen(m, torch.bfloat16, "cpu")
        assert hf.pack_self_attention(ours) == (0 if name.startswith("wavlm") else 1), name
        if name.startswith("wavlm"):
            continue
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = (m(wav, attention_mask=mask).last_hidden_state for m in (model, ours))
            frames = [got.shape[1], int(model._get_feat_extract_output_lengths(8000))]
            assert frames[1] < frames[0] and frames[0] % 16 != 0  # padded keys, and keys padded here
            for i, n in enumerate(frames):
                assert_near(got[i, :n], want[i, :n], (name, i))

            x = torch.randn(2, 9, model.config.hidden_size)
            theirs, packed = model.encoder.layers[0].attention, ours.encoder.layers[0].attention
            padding = create_bidirectional_mask(config=model.config, inputs_embeds=x,
                                                attention_mask=torch.tensor([[1] * 9, [1] * 6 + [0] * 3]))
            assert hf.padding_lengths(padding, 9) == [9, 6]
            got, want = packed(x, attention_mask=padding)[0], theirs(x, attention_mask=padding)[0]
            assert_near(got[0], want[0], name)
            assert_near(got[1, :6], want[1, :6], name)
            causal = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9)
            assert_near(packed(x, attention_mask=causal)[0], theirs(x, attention_mask=causal)[0], name)
            assert_near(packed(x)[0], theirs(x)[0], name)


def test_conv_activation_runs_in_place_only_where_it_is_exact_gelu():
    """The feature encoder overwrites each conv output with its GELU (the largest tensors of the
    model); any other activation, the tanh approximations included, is the module's own call."""
    from transformers.activations import ACT2FN

    from emofuse.extract.encoders.conv_features import activate

    x = torch.randn(64, 8) * 3
    cases = {name: ACT2FN[name] for name in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")}
    cases.update({"nn.GELU": torch.nn.GELU(), "nn.GELU tanh": torch.nn.GELU(approximate="tanh")})
    for name, activation in cases.items():
        fresh = x.clone()
        got = activate(activation, fresh)
        assert torch.equal(got, activation(x)), name
        assert (got.data_ptr() == fresh.data_ptr()) == (name in ("gelu", "nn.GELU")), name


def test_unsupported_conv_layers_keep_transformers_encoder():
    """A GroupNorm that pools channels (or a padded conv) is not what the fast path computes: the
    model keeps transformers' own encoder, and the spec says so."""
    from emofuse.extract.encoders.conv_features import use_channels_last_feature_encoder

    name, model = next(audio_models())
    original = model.feature_extractor
    original.conv_layers[0].layer_norm = torch.nn.GroupNorm(4, 16)
    assert not use_channels_last_feature_encoder(model) and model.feature_extractor is original
    name, model = next(audio_models())
    model.feature_extractor.conv_layers[3].conv.padding = (1,)
    assert not use_channels_last_feature_encoder(model)


@pytest.mark.parametrize("kind", ["bert", "roberta", "minilm", "w2v_layer"])
def test_top_layers_rerun_on_the_cached_state_below_give_the_encoders_output(tiny, kind, tmp_path):
    """model.unfreeze_top: the encoder's top n layers, loaded into the fusion model's EncoderLayer
    and fed the hidden state below them as a `layer: all` cache keeps it, give the encoder's own last
    hidden state, in a padded batch too (max abs difference under 1e-5 in float32). MiniLM's real
    weights give activations large enough to tell GELU from its tanh approximation."""
    from emofuse.fuse.model import EncoderLayer

    spec = {"backend": "minilm"} if kind == "minilm" else {"backend": "hf", "path": tiny[kind]}
    if kind.startswith("w2v"):
        enc = build_encoder("audio", {**spec, "layer": "all"})
        utts = [wav_utt(tmp_path, f"c{i}", seconds, seed=i) for i, seconds in enumerate([1.0, 2.5, 0.6])]
    else:
        enc = build_encoder("text", {**spec, "layer": "all"})
        utts = [Utterance(id=str(i), text=t) for i, t in enumerate(
            ["a short one", "and a somewhat longer sentence than the first, I am so angry!", "yes"])]
    outs = enc.encode([enc.prepare(u) for u in utts])
    T, L = max(len(o) for o in outs), enc.layers_out  # L: the input to the layers + every layer
    cached = torch.zeros(len(outs), T, L, enc.dim)
    valid = torch.zeros(len(outs), T, dtype=torch.bool)
    for b, o in enumerate(outs):
        cached[b, : len(o)], valid[b, : len(o)] = torch.from_numpy(o), True
    for n in (1, 2):
        shape, weights = enc.top_layers(n)
        if kind != "minilm":
            eps = 1e-5 if kind.startswith("w2v") else 1e-12
            assert shape == dict(width=32, heads=2, ffn=64, eps=eps, dropout=0.1, attn_dropout=0.1)
        layers = torch.nn.ModuleList(EncoderLayer(**shape) for _ in range(n)).eval()
        layers.load_state_dict(weights)  # strict: every weight named and used
        x = cached[:, :, L - 1 - n]
        with torch.no_grad():
            for layer in layers:
                x = layer(x, valid)
        assert maxdiff(x[valid].numpy(), cached[:, :, L - 1][valid].numpy()) < TOL
    with pytest.raises(UserError, match=f"cannot unfreeze {L}"):
        enc.top_layers(L)
    pre_ln = build_encoder("audio", {"backend": "hf", "path": tiny["w2v_stable"]})
    with pytest.raises(UserError, match="not pre-LN"):
        pre_ln.top_layers(1)


def test_hf_errors(tiny, tmp_path):
    for path in [str(tmp_path / "nowhere"), "facebook/wav2vec2-base"]:
        with pytest.raises(UserError, match="does not exist") as e:
            build_encoder("audio", {"backend": "hf", "path": path})
        assert path in str(e.value)
    with pytest.raises(UserError, match="required"):
        build_encoder("audio", {"backend": "hf"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        build_encoder("audio", {"backend": "hf", "path": str(tmp_path / "empty")})
    with pytest.raises(UserError, match="layer"):
        build_encoder("audio", {"backend": "hf", "path": tiny["w2v_layer"], "layer": 7})
    with pytest.raises(UserError, match="wav2vec2-style"):
        build_encoder("audio", {"backend": "hf", "path": tiny["bert"], "modality": "audio"})
    with pytest.raises(UserError, match="not a text encoder"):
        build_encoder("text", {"backend": "hf", "path": tiny["w2v_layer"], "modality": "text"})
    with pytest.raises(UserError, match="bad option"):
        build_encoder("audio", {"backend": "hf", "path": tiny["w2v_layer"], "no_such_option": 1})

    enc = build_encoder("audio", {"backend": "hf", "path": tiny["w2v_layer"]})
    tiny_wav = tmp_path / "tiny.wav"
    sf.write(tiny_wav, np.zeros(200, np.float32) + 0.1, 16000)
    with pytest.raises(PrepareError) as e:
        enc.prepare(Utterance(id="t", audio=str(tiny_wav)))
    assert e.value.stage == "audio" and "too short" in e.value.reason
    text = build_encoder("text", {"backend": "hf", "path": tiny["bert"]})
    with pytest.raises(PrepareError, match="empty transcript"):
        text.prepare(Utterance(id="e", text=" "))


def test_faces_found_in_strided_views():
    """dlib misreads non-contiguous arrays (a face is missed about half the time, more under load):
    a half-frame view, as two-person IEMOCAP frames give, must find the face every time."""
    from skimage import data

    face = data.astronaut()[40:296, 96:352]
    wide = np.concatenate([face, np.zeros_like(face)], axis=1)
    view = wide[:, :256]
    assert not view.flags.c_contiguous
    expected = faces.detect_faces(np.ascontiguousarray(view), "dlib", 1)
    assert len(expected) == 1
    for _ in range(40):
        _ = [np.random.rand(1000) for _ in range(50)]  # churn the allocator, as a busy process does
        assert faces.detect_faces(view, "dlib", 1) == expected
    assert faces.speaker_half(wide[None], "left").flags.c_contiguous


def test_face_side_picks_the_speakers_half(dlib_enc, tmp_path):
    """IEMOCAP-style two-person frames: the face on the labelled side is the one encoded."""
    from skimage import data

    face = data.astronaut()[40:296, 96:352]
    frames = np.stack([np.concatenate([face, np.zeros_like(face)], axis=1)] * 10)  # face on the left only
    path = tmp_path / "two.mp4"
    write_mp4(path, frames, fps=10)
    left = dlib_enc.prepare(Utterance(id="l", video=str(path), labels={"face_side": "left"}))
    assert len(left["landmarks"]) == 5
    with pytest.raises(PrepareError) as e:  # the right half is empty: no face there
        dlib_enc.prepare(Utterance(id="r", video=str(path), labels={"face_side": "right"}))
    assert e.value.stage == "face"


def test_gpu_autocast_context_avoids_cudnn_attention():
    """On a GPU, lower-precision forwards run without cuDNN's attention (it re-plans for every new
    sequence length); the setting is scoped to the forward. Checked through torch's flags, which
    exist on a CPU-only build too."""
    import warnings

    from emofuse.extract.encoders.hf import precision

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": autocast for cuda is then a no-op
        with precision(torch.bfloat16, "cuda:0"):
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with precision(torch.bfloat16, "cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled()  # nothing changes on the CPU
