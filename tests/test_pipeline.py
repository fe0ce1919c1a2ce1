"""The extraction pipeline on real encoders: all-layer caches, failures, resume, and that the
features do not depend on batching or on the number of preparation threads."""

import numpy as np
import torch

from emofuse.cache.store import FeatureStore
from emofuse.corpora.base import Utterance
from emofuse.extract.encoders.base import build_encoder
from emofuse.extract.pipeline import ModalityResult, count_failure, extract_modality, summary_lines
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


def test_features_independent_of_budget_and_threads(tmp_path):
    enc = build_encoder("text", {"backend": "minilm"})
    a = extract_modality(utterances(), enc, tmp_path / "a", budget=10_000, workers=2, progress=False, log=lambda *_: None)
    b = extract_modality(utterances(), enc, tmp_path / "b", budget=1, workers=1, progress=False, log=lambda *_: None)
    sa, sb = FeatureStore(a.store), FeatureStore(b.store)
    assert sorted(sa.ids()) == sorted(sb.ids())
    for uid in sa.ids():
        np.testing.assert_array_equal(sa.get(uid), sb.get(uid))  # bit for bit, whatever the batches


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
