"""The fairseq backend against fairseq itself.

Tiny random models are built with fairseq's own classes (from fairseq-train's argument parser, as a
training run would), saved the way fairseq saves them (old releases: `args` Namespace, pre-1.6 torch
file format, numpy scalars in the training state; newer ones: a `cfg` dict, or a pickled OmegaConf
config with the task's Dictionary objects, as HuBERT's), and loaded back by fairseq's own
checkpoint_utils / RobertaModel.from_pretrained as the reference. What emofuse computes (and writes
to the cache) must equal fairseq's forward, for every layer and across the chunked path.

Run with the fairseq extra installed (pip install emofuse[fairseq]); skipped otherwise, except the
checks that need no fairseq.
"""

import json
import sys
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from emofuse.cache.store import FeatureStore
from emofuse.corpora.base import Utterance
from emofuse.errors import UserError
from emofuse.extract.encoders.base import build_encoder, file_sha256
from emofuse.extract.encoders.chunking import conv_output_length
from emofuse.extract.pipeline import extract_modality

TOL = 1e-5
CONV = "[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2"  # wav2vec 2.0's layout, 16 channels
SMALL = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
         "--encoder-attention-heads", "2"]
MAXDIFFS = {}  # what each comparison measured, printed at the end (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def report_maxdiffs(one_thread):
    yield
    if MAXDIFFS:
        print("\nmax abs differences vs fairseq:", {k: f"{v:.1e}" for k, v in sorted(MAXDIFFS.items())})


def maxdiff(a, b, what=None):
    assert a.shape == b.shape, (a.shape, b.shape)
    d = float(np.abs(a - b).max())
    if what:
        MAXDIFFS[what] = max(d, MAXDIFFS.get(what, 0.0))
    return d


def speech_like(seconds, sr=16000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = np.sin(2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 2 * t)) / sr)
    return (0.3 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def wav_utt(tmp_path, name, seconds, seed=0):
    path = tmp_path / f"{name}.wav"
    sf.write(path, speech_like(seconds, seed=seed), 16000)
    return Utterance(id=name, audio=str(path))


# ---------------------------------------------------------------------------------------------
# checks that need no fairseq


def test_missing_checkpoint_says_what_to_put_where(tmp_path):
    with pytest.raises(UserError, match="option 'path' is required"):
        build_encoder("audio", {"backend": "fairseq"})
    with pytest.raises(UserError, match=r"not found.*wav2vec_large.pt"):
        build_encoder("audio", {"backend": "fairseq", "path": str(tmp_path / "wav2vec_large.pt")})
    with pytest.raises(UserError, match=r"model.pt.*not found.*dict.txt, encoder.json, vocab.bpe"):
        build_encoder("text", {"backend": "fairseq", "path": str(tmp_path)})


def test_missing_fairseq_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "wav2vec_small.pt"
    torch.save({"model": {}}, path)
    monkeypatch.setitem(sys.modules, "fairseq", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install emofuse\[fairseq\]"):
        build_encoder("audio", {"backend": "fairseq", "path": str(path)})


# ---------------------------------------------------------------------------------------------
# tiny fairseq models, saved as fairseq saves them


@pytest.fixture(scope="module")
def fs():
    pytest.importorskip("fairseq")
    from emofuse.extract.encoders.fairseq_backend import import_fairseq

    return import_fairseq()


def build(argv, seed=0):
    """A model as fairseq-train builds it: args from its parser, cfg, task, model."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hydra's deprecation notices
        args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
        cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    model = task.build_model(cfg.model)
    with torch.no_grad():  # move every weight off its init value (LayerNorm 1/0, ...), as training would
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return args, cfg, task, model.eval()


def training_state(**extra):
    """The optimiser and training bookkeeping a real checkpoint carries (numpy scalars included)."""
    return {
        "optimizer_history": [{"criterion_name": "Wav2vecCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": np.float64(2.25)}, "num_updates": 400}],
        "last_optimizer_state": {"state": {0: {"step": torch.tensor(400.0), "exp_avg": torch.zeros(4)}},
                                 "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.98), "params": [0]}]},
        **extra,
    }


def save_legacy(path, args, model, rename=None):
    """fairseq <= 0.9 (wav2vec_large.pt, roberta.base): `args` Namespace, pre-1.6 torch format."""
    sd = model.state_dict()
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    state = {"args": args, "model": sd, **training_state(extra_state={
        "epoch": 10, "val_loss": np.float64(2.25), "train_iterator": {"epoch": 10, "iterations_in_epoch": 0}})}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return str(path)


def save_hydra(path, cfg, task, model, pickled_config=False):
    """fairseq >= 0.10 (Trainer.state_dict + checkpoint_utils.torch_persistent_save): `cfg` as a plain
    dict, or (some releases, e.g. HuBERT's) as a pickled OmegaConf config; task_state holds the
    task's state (HuBERT: its label Dictionary objects)."""
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    state = {"args": None, "cfg": OmegaConf.create(plain) if pickled_config else plain,
             "model": model.state_dict(), "criterion": None, "task_state": task.state_dict(),
             **training_state(extra_state={"metrics": {"train": [("loss", 0, "AverageMeter", {
                 "val": np.float64(2.3), "sum": np.float64(230.0), "count": 100, "round": 3})]},
                 "previous_training_time": 321.5, "train_iterator": {"epoch": 3}})}
    checkpoint_utils.torch_persistent_save(state, str(path))
    return str(path)


def tiny_bpe(folder):
    """GPT-2 BPE files: every byte symbol, plus a few merges; dict.txt lists every BPE id."""
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("l", "l"), ("i", "n"), ("Ġ", "a")]
    vocab = {s: i for i, s in enumerate(symbols + ["".join(m) for m in merges])}
    (folder / "encoder.json").write_text(json.dumps(vocab))
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "dict.txt").write_text("".join(f"{i} {1000 - i}\n" for i in range(len(vocab))))


@pytest.fixture(scope="module")
def ckpt(fs, tmp_path_factory):
    root = tmp_path_factory.mktemp("fairseq")
    out = {}

    # wav2vec 2.0, large-lv60 style: layer-norm feature encoder, pre-LN transformer, normalised input
    argv = ["/data", "--task", "audio_pretraining", "--normalize", "--arch", "wav2vec2", "--criterion", "wav2vec",
            "--extractor-mode", "layer_norm", "--layer-norm-first", "--conv-feature-layers", CONV,
            "--conv-pos", "16", "--conv-pos-groups", "2", "--final-dim", "16", "--latent-vars", "8"] + SMALL
    args, cfg, task, model = build(argv, seed=1)
    out["w2v2_layer"] = save_hydra(root / "w2v2_layer.pt", cfg, task, model)

    # wav2vec 2.0, base style (group-norm feature encoder, post-LN), saved by an old fairseq
    argv = ["/data", "--task", "audio_pretraining", "--arch", "wav2vec2", "--criterion", "wav2vec",
            "--conv-feature-layers", CONV, "--conv-pos", "16", "--conv-pos-groups", "2", "--final-dim", "16",
            "--latent-vars", "8"] + SMALL
    args, cfg, task, model = build(argv, seed=2)
    out["w2v2_group"] = save_legacy(root / "w2v2_group.pt", args, model)

    # HuBERT: label dictionaries in task_state, config pickled as OmegaConf
    labels = root / "labels"
    labels.mkdir()
    (labels / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(20)))
    argv = ["/data", "--task", "hubert_pretraining", "--labels", '["km"]', "--label-dir", str(labels),
            "--label-rate", "50", "--arch", "hubert", "--criterion", "hubert", "--conv-feature-layers", CONV,
            "--conv-pos", "16", "--conv-pos-groups", "2", "--final-dim", "16"] + SMALL
    args, cfg, task, model = build(argv, seed=3)
    task.dictionaries  # noqa: B018 - loaded, so that they are saved in task_state as in a real run
    out["hubert"] = save_hydra(root / "hubert.pt", cfg, task, model, pickled_config=True)
    (labels / "dict.km.txt").unlink()  # the checkpoint alone must do

    # wav2vec 1.0 (the paper's wav2vec_large.pt layout, scaled down), old fairseq
    argv = ["/data", "--task", "audio_pretraining", "--arch", "wav2vec", "--criterion", "wav2vec",
            "--conv-feature-layers", "[(16, 10, 5), (16, 8, 4), (16, 4, 2), (16, 4, 2), (16, 4, 2), (16, 1, 1)]",
            "--conv-aggregator-layers", "[(24, 2, 1), (24, 3, 1), (24, 4, 1)]", "--prediction-steps", "3",
            "--skip-connections-agg", "--log-compression", "--residual-scale", "0.5"]
    args, cfg, task, model = build(argv, seed=4)
    args.arch = "audio_cpc"  # the name the 2019 release was trained under
    out["wav2vec1"] = save_legacy(root / "wav2vec_large.pt", args, model)

    # RoBERTa: a folder like roberta.base (2019 key names: decoder.*, emb_layer_norm)
    folder = root / "roberta"
    folder.mkdir()
    tiny_bpe(folder)
    argv = [str(folder), "--task", "masked_lm", "--arch", "roberta_base", "--criterion", "masked_lm",
            "--max-positions", "40", "--tokens-per-sample", "40"] + SMALL
    args, cfg, task, model = build(argv, seed=5)
    old_names = lambda k: k.replace("encoder.", "decoder.", 1).replace(".layernorm_embedding.", ".emb_layer_norm.")  # noqa: E731
    save_legacy(folder / "model.pt", args, model, rename=old_names)
    out["roberta"] = str(folder)
    # ... and as a newer fairseq saves it (cfg dict whose model entry is an argparse Namespace)
    hydra = root / "roberta_hydra"
    hydra.mkdir()
    tiny_bpe(hydra)
    save_hydra(hydra / "model.pt", cfg, task, model)
    out["roberta_hydra"] = str(hydra)
    return out


# ---------------------------------------------------------------------------------------------
# the reference: fairseq's own loading and forward


def fairseq_load(path, **overrides):
    from fairseq import checkpoint_utils

    from emofuse.extract.encoders.fairseq_backend import safe_globals

    # fairseq 0.12 predates torch's weights_only default; allow what its files hold
    with torch.serialization.safe_globals(safe_globals()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=overrides)
    return models[0].eval()


def fairseq_states(model, wav):
    """Every hidden state of fairseq's forward over one unpadded waveform, via its public API:
    layer k's output with layer=k (wav2vec 2.0: 0-based; HuBERT: 1-based), the final output with
    layer=None; the transformer's input from the model's modules in forward's order."""
    kind = type(model).__name__
    src = torch.from_numpy(wav)[None]
    with torch.inference_mode():
        if kind == "Wav2VecModel":
            return [model.feature_aggregator(model.feature_extractor(src))[0].T.float().numpy()]
        feats = model.layer_norm(model.feature_extractor(src).transpose(1, 2))
        if model.post_extract_proj is not None:
            feats = model.post_extract_proj(feats)
        x = feats + model.encoder.pos_conv(feats.transpose(1, 2)).transpose(1, 2)
        if not model.encoder.layer_norm_first:
            x = model.encoder.layer_norm(x)
        states = [x[0]]
        n = len(model.encoder.layers)
        for k in list(range(1, n)) + [None]:
            if kind == "HubertModel":
                h, _ = model.extract_features(src, mask=False, output_layer=k)
            else:
                h = model.extract_features(src, None, mask=False, layer=None if k is None else k - 1)["x"]
            states.append(h[0])
        return [s.float().numpy() for s in states]  # float: under autocast some are bf16


def packed_kernel(fused_gelus: int, model) -> str:
    """The linear_kernel a bf16 CPU encoder should report, after checking that its model's first
    feed-forward Linears apply fairseq's exact GELU themselves (hf.fuse_gelu) where oneDNN packs."""
    from emofuse.extract.encoders.hf import PackedLinear, onednn_packing_works

    if not onednn_packing_works():
        return "aten"
    fused = [m for m in model.modules() if isinstance(m, PackedLinear) and m.activation == "gelu"]
    assert len(fused) == fused_gelus
    from fairseq.modules.gelu import gelu

    # the feed-forward blocks' separate GELUs are gone (RoBERTa's unused LM head keeps its own)
    assert not any(hasattr(m, "fc1") and m.activation_fn is gelu for m in model.modules())
    return "onednn-packed, fused GELU" if fused_gelus else "onednn-packed"


def normalised(enc, wav):
    return torch.nn.functional.layer_norm(torch.from_numpy(wav), wav.shape).numpy() if enc.normalize else wav


AUDIO = ["w2v2_layer", "w2v2_group", "hubert", "wav2vec1"]


# ---------------------------------------------------------------------------------------------
# audio


@pytest.mark.parametrize("name", AUDIO)
def test_audio_equals_fairseq(ckpt, tmp_path, name):
    enc = build_encoder("audio", {"backend": "fairseq", "path": ckpt[name]})
    ref_model = fairseq_load(ckpt[name])
    kind = type(ref_model).__name__
    assert enc.modality == "audio" and enc.kind == kind and enc.fps == 16000 / enc.hop
    assert enc.masked and enc.normalize == (name == "w2v2_layer")
    assert enc.dim == (24 if name == "wav2vec1" else 32)

    utts = [wav_utt(tmp_path, f"u{i}", s, seed=i) for i, s in enumerate([0.5, 0.83, 1.2, 0.5])]
    items = [enc.prepare(u) for u in utts]
    for u, it in zip(utts, items):
        np.testing.assert_array_equal(it, normalised(enc, sf.read(u.audio, dtype="float32")[0]))
    outs = enc.encode(items)
    for it, out in zip(items, outs):
        ref = fairseq_states(ref_model, it)[-1]
        assert out.shape == (conv_output_length(len(it), enc.kernels, enc.strides), enc.dim) == ref.shape
        assert maxdiff(out, ref, f"{name} final") < TOL
    alone = [enc.encode([it])[0] for it in items]  # batch invariance
    assert max(maxdiff(a, b, f"{name} batched vs alone") for a, b in zip(outs, alone)) < TOL

    spec = enc.full_spec()
    assert spec["checkpoint_sha256"] == {ckpt[name].rsplit("/", 1)[1]: file_sha256(ckpt[name])}
    assert spec["model_type"] == kind and spec["sample_rate"] == 16000 and spec["layer"] == -1


@pytest.mark.parametrize("name", ["w2v2_layer", "w2v2_group", "hubert"])
def test_every_layer_equals_fairseq(ckpt, tmp_path, name):
    ref_model = fairseq_load(ckpt[name])
    every = build_encoder("audio", {"backend": "fairseq", "path": ckpt[name], "layer": "all"})
    assert every.layers_out == 3
    items = [every.prepare(wav_utt(tmp_path, f"a{i}", s, seed=i)) for i, s in enumerate([0.7, 1.1])]
    outs = every.encode(items)
    for it, out in zip(items, outs):
        refs = fairseq_states(ref_model, it)
        assert out.shape == (len(refs[0]), 3, 32)
        for k, ref in enumerate(refs):
            assert maxdiff(out[:, k], ref, f"{name} layer {k}") < TOL
    one = build_encoder("audio", {"backend": "fairseq", "path": ckpt[name], "layer": 1})
    assert maxdiff(one.encode(items[:1])[0], outs[0][:, 1]) < TOL
    with pytest.raises(UserError, match="layer must be"):
        build_encoder("audio", {"backend": "fairseq", "path": ckpt[name], "layer": 3})


@pytest.mark.parametrize("name", AUDIO)
def test_bf16_is_as_close_to_float32_as_fairseqs_own_autocast(ckpt, tmp_path, name):
    """In bf16 the backend runs fairseq's convs channels last (conv_features.py; wav2vec 1.0's whole,
    as its GroupNorms pool each layer's whole output: Wav2vec1Features), its weights cast once (and
    packed for oneDNN where the CPU can), and its first layer on a contiguous input. Every hidden state stays
    about as close to fairseq's float32 forward as fairseq's own forward under autocast (bf16
    rounding either way: ~1-3% relative error here); float32 stores keep their spec."""
    ref_model = fairseq_load(ckpt[name])
    layer = -1 if name == "wav2vec1" else "all"
    enc = build_encoder("audio", {"backend": "fairseq", "path": ckpt[name], "layer": layer, "dtype": "bfloat16"})
    spec = enc.full_spec()
    tiled = "channels-last-matmul, tiles of 256 frames"
    assert spec["feature_encoder"] == ("channels-last-matmul, whole" if name == "wav2vec1" else tiled)
    assert spec["linear_kernel"] == enc.linear_kernel == packed_kernel(fused_gelus=0 if name == "wav2vec1" else 2,
                                                                        model=enc.model)
    f32_spec = build_encoder("audio", {"backend": "fairseq", "path": ckpt[name]}).full_spec()
    assert "linear_kernel" not in f32_spec
    assert f32_spec["feature_encoder"] == spec["feature_encoder"]  # one conv encoder in every dtype

    items = [enc.prepare(wav_utt(tmp_path, f"b{i}", s, seed=i)) for i, s in enumerate([0.7, 1.1])]
    for it, out in zip(items, enc.encode(items)):
        out = out[:, None] if out.ndim == 2 else out  # (T, L, D)
        ref = fairseq_states(ref_model, it)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = fairseq_states(ref_model, it)
        assert out.shape[1] == len(ref)
        for k, (r, t) in enumerate(zip(ref, theirs)):
            error = lambda a: float(np.linalg.norm(a - r) / np.linalg.norm(r))  # noqa: E731
            # measured: 1.02-1.21x here, 0.88-1.23x at wav2vec2-base size (bench/README.md)
            assert error(out[:, k]) < 1.3 * error(t), (name, k, error(out[:, k]), error(t))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["w2v2_group", "hubert", "wav2vec1"])
def test_group_norm_models_batch_with_a_mask(ckpt, tmp_path, monkeypatch, name, dtype):
    """Group-norm wav2vec 2.0 and HuBERT (both the base layout) run their convs through
    conv_features in every dtype, which takes each input's GroupNorm statistics from its own
    samples, and HuBERT gets a padding mask drawn at its frames (_padding_mask); wav2vec 1.0's
    features are computed for each input alone and its causal aggregator's norms take each input's
    statistics from its own frames (MaskedGroupNorm). So all are batched, padded and masked like a
    layer-norm model. Padded in one forward, every hidden state of each clip equals fairseq's
    forward of that clip alone (float32), or stays as close to it as fairseq's own forward under
    autocast (bf16)."""
    from emofuse.extract.encoders.hf import AUDIO_PADDING

    layer = -1 if name == "wav2vec1" else "all"
    enc = build_encoder("audio", {"backend": "fairseq", "path": ckpt[name], "layer": layer, "dtype": dtype})
    assert enc.masked and enc.full_spec()["padding"] == AUDIO_PADDING
    forwards = []
    inner = enc._forward_padded
    monkeypatch.setattr(enc, "_forward_padded", lambda inputs, n: forwards.append([len(x) for x in inputs]) or inner(inputs, n))
    # HuBERT's own frame mask would give the 2.3 s clip a 115th frame here, from the padding
    items = [enc.prepare(wav_utt(tmp_path, f"g{i}", s, seed=i)) for i, s in enumerate([2.47, 2.3, 2.4])]
    outs = enc.encode(items)
    assert len(forwards) == 1 and len(set(forwards[0])) == 3  # one forward of three lengths, padded to 2.5 s
    ref_model = fairseq_load(ckpt[name])
    for it, out in zip(items, outs):
        ref = fairseq_states(ref_model, it)
        out = out[:, None] if out.ndim == 2 else out  # (T, L, D)
        assert out.shape[:2] == (len(ref[0]), len(ref))
        if dtype == "float32":
            assert max(maxdiff(out[:, k], r, f"{name} padded batch") for k, r in enumerate(ref)) < TOL
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = fairseq_states(ref_model, it)
        for k, (r, t) in enumerate(zip(ref, theirs)):
            error = lambda a: float(np.linalg.norm(a - r) / np.linalg.norm(r))  # noqa: E731
            assert error(out[:, k]) < 1.3 * error(t), (k, error(out[:, k]), error(t))


@pytest.mark.parametrize("name", ["w2v2_layer", "hubert"])
def test_packed_self_attention_equals_fairseqs_on_padded_batches(ckpt, name):
    """In bf16 on a CPU each fairseq self-attention runs as PackedFairseqSelfAttention (one packed
    q/k/v projection, keys zero-padded to a multiple of 16 and masked, the output projection packed)
    and agrees with fairseq's MultiheadAttention to bf16 rounding on a padded batch and without a
    mask. Calls it does not cover (attention weights asked for, a padding mask that is not each
    input's tail) run fairseq's own forward. The spec records it; float32 keeps fairseq's."""
    from emofuse.extract.encoders.fairseq_backend import PackedFairseqSelfAttention, tail_padding_lengths
    from emofuse.extract.encoders.hf import PACKED_ATTENTION, prepare_frozen

    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("this torch build or CPU has no oneDNN bf16 matmul")

    def assert_near(got, want):  # bf16 rounding: a few 0.4% steps, relative to the outputs' scale
        got, want = got.float(), want.float()
        assert float((got - want).abs().max()) < 0.03 * float(want.abs().max())

    model = fairseq_load(ckpt[name])
    theirs = model.encoder.layers[0].self_attn
    torch.manual_seed(1)
    for p in theirs.parameters():  # unit gain: fairseq's init leaves attention outputs near zero
        p.data.normal_(0, theirs.embed_dim ** -0.5)
    prepare_frozen(model, torch.bfloat16, "cpu")
    ours = PackedFairseqSelfAttention(theirs)
    frames, lengths = 21, [21, 15, 9]
    x = torch.randn(frames, len(lengths), theirs.embed_dim)  # fairseq's (T, B, C)
    tail = torch.arange(frames) >= torch.tensor(lengths)[:, None]
    head = torch.arange(frames) < torch.tensor([0, 6, 12])[:, None]  # padding in front: not a tail
    assert tail_padding_lengths(tail, 3, frames) == lengths and tail_padding_lengths(head, 3, frames) is None
    assert tail_padding_lengths(None, 3, frames) == [frames] * 3
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, none = ours(x, x, x, key_padding_mask=tail, need_weights=False)
        want = theirs(x, x, x, key_padding_mask=tail, need_weights=False)[0]
        assert none is None
        for b, n in enumerate(lengths):
            assert_near(got[:n, b], want[:n, b])
        assert_near(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0])
        for kwargs in ({"key_padding_mask": tail}, {"key_padding_mask": head, "need_weights": False}):
            assert torch.equal(ours(x, x, x, **kwargs)[0], theirs(x, x, x, **kwargs)[0])  # fairseq's own

    enc = build_encoder("audio", {"backend": "fairseq", "path": ckpt[name], "dtype": "bfloat16"})
    replaced = sum(isinstance(m, PackedFairseqSelfAttention) for m in enc.model.modules())
    assert replaced == len(enc.model.encoder.layers) and enc.full_spec()["attention"] == PACKED_ATTENTION
    assert "attention" not in build_encoder("audio", {"backend": "fairseq", "path": ckpt[name]}).full_spec()


@pytest.mark.parametrize("name", ["w2v2_layer", "hubert"])
def test_positional_conv_prepared_for_a_gpu_stays_float32(ckpt, tmp_path, name):
    """What prepare_frozen does on a GPU in bf16 (hf.Float32Conv1d: cuDNN ran the positional conv
    13x slower in bf16 than in float32 on an H200) fits fairseq's encoder too: its pos_conv's conv
    is replaced, and fairseq's own forward under autocast, run here on the CPU, stays about as
    close to float32 as without the change."""
    from emofuse.extract.encoders.hf import Float32Conv1d, prepare_frozen

    ref_model, prepared = fairseq_load(ckpt[name]), fairseq_load(ckpt[name])
    assert prepare_frozen(prepared, torch.bfloat16, "cuda") == ("aten", 1)
    assert isinstance(prepared.encoder.pos_conv[0], Float32Conv1d)
    wav = normalised(build_encoder("audio", {"backend": "fairseq", "path": ckpt[name]}), speech_like(0.9, seed=3))
    ref = fairseq_states(ref_model, wav)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs, ours = fairseq_states(ref_model, wav), fairseq_states(prepared, wav)
    for k, (r, t, o) in enumerate(zip(ref, theirs, ours)):
        error = lambda a: float(np.linalg.norm(a - r) / np.linalg.norm(r))  # noqa: E731
        assert error(o) < 1.1 * error(t), (name, k, error(o), error(t))


@pytest.mark.parametrize("name", AUDIO)
def test_long_audio_is_chunked_and_each_window_equals_fairseq(ckpt, tmp_path, name):
    enc = build_encoder("audio", {"backend": "fairseq", "path": ckpt[name], "chunk_seconds": 0.4, "overlap_seconds": 0.1})
    ref_model = fairseq_load(ckpt[name])
    item = enc.prepare(wav_utt(tmp_path, "long", 1.3, seed=7))
    spans = enc._spans(len(item))
    assert len(spans) >= 3
    out = enc.encode([item])[0]
    assert out.shape == (conv_output_length(len(item), enc.kernels, enc.strides), enc.dim)  # nothing dropped
    refs = [fairseq_states(ref_model, item[s:e])[-1] for s, e in spans]
    starts = [s // enc.hop for s, _ in spans]
    ends = [s + len(r) for s, r in zip(starts, refs)]
    cuts = [(starts[k + 1] + ends[k]) // 2 for k in range(len(spans) - 1)]
    for k, (lo, hi) in enumerate(zip([0] + cuts, cuts + [len(out)])):
        assert maxdiff(out[lo:hi], refs[k][lo - starts[k] : hi - starts[k]], f"{name} chunked") < TOL


def test_wav2vec1_has_one_output(ckpt):
    with pytest.raises(UserError, match="wav2vec 1.0 has one output"):
        build_encoder("audio", {"backend": "fairseq", "path": ckpt["wav2vec1"], "layer": 2})


def test_cache_holds_fairseqs_output(ckpt, tmp_path):
    enc = build_encoder("audio", {"backend": "fairseq", "path": ckpt["w2v2_layer"]})
    ref_model = fairseq_load(ckpt["w2v2_layer"])
    utts = [wav_utt(tmp_path, f"c{i}", s, seed=i) for i, s in enumerate([0.6, 0.9, 1.4])]
    result = extract_modality(utts, enc, tmp_path / "cache", budget=16000 * 4, workers=1, progress=False,
                              log=lambda *a: None)
    assert result.encoded == 3
    store = FeatureStore(result.store)
    for u in utts:
        ref = fairseq_states(ref_model, enc.prepare(u))[-1]
        # float16 cache: its rounding, on top of the backend's float32 bound (its convs are emofuse's)
        np.testing.assert_allclose(store.get(u.id).astype(np.float32), ref, rtol=2**-11, atol=TOL)
    assert FeatureStore.verify(result.store) == []


# ---------------------------------------------------------------------------------------------
# RoBERTa


@pytest.fixture(scope="module", params=["roberta", "roberta_hydra"])
def roberta(request, ckpt):
    return ckpt[request.param]


@pytest.fixture(scope="module")
def hub(roberta):
    """fairseq's RoBERTa hub interface over the same folder: its own BPE, tokens and forward."""
    from fairseq.models.roberta import RobertaModel

    from emofuse.extract.encoders.fairseq_backend import safe_globals

    folder = roberta
    with torch.serialization.safe_globals(safe_globals()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roberta = RobertaModel.from_pretrained(folder, "model.pt", bpe="gpt2", gpt2_encoder_json=f"{folder}/encoder.json",
                                               gpt2_vocab_bpe=f"{folder}/vocab.bpe")
    return roberta.eval()


TEXTS = ["Hello there, the weather is fine.", "I am angry!", "in the hall the hen ate"]


def test_roberta_equals_fairseq(roberta, hub):
    enc = build_encoder("text", {"backend": "fairseq", "path": roberta, "layer": "all"})
    assert enc.modality == "text" and enc.kind == "RobertaModel" and enc.dim == 32 and enc.max_tokens == 40
    items = [enc.prepare(Utterance(id=str(i), text=t)) for i, t in enumerate(TEXTS)]
    outs = enc.encode(items)
    for text, it, out in zip(TEXTS, items, outs):
        tokens = hub.encode(text)
        assert enc.prefix + it.tolist() + enc.suffix == tokens.tolist()  # the same tokens as fairseq's
        with torch.inference_mode():
            refs = hub.extract_features(tokens, return_all_hiddens=True)
        assert out.shape == (len(tokens), 3, 32) and len(refs) == 3
        for k, ref in enumerate(refs):
            assert maxdiff(out[:, k], ref[0].numpy(), f"roberta layer {k}") < TOL
    alone = [enc.encode([it])[0] for it in items]
    assert max(maxdiff(a, b, "roberta batched vs alone") for a, b in zip(outs, alone)) < TOL

    last = build_encoder("text", {"backend": "fairseq", "path": roberta})
    assert maxdiff(last.encode(items[:1])[0], outs[0][:, -1]) < TOL
    spec = last.full_spec()
    assert set(spec["checkpoint_sha256"]) == {"model.pt", "dict.txt", "encoder.json", "vocab.bpe"}
    assert spec["max_tokens"] == 40 and spec["layer"] == -1 and spec["modality"] == "text"
    assert spec["padding"] == "exact"  # HFEncoder._forward's text padding, in the fingerprint


def test_roberta_bf16_is_as_close_to_float32_as_fairseqs_own_autocast(roberta, hub):
    """bf16 RoBERTa with its weights cast once (and packed for oneDNN where the CPU can)."""
    enc = build_encoder("text", {"backend": "fairseq", "path": roberta, "layer": "all", "dtype": "bfloat16"})
    assert enc.full_spec()["linear_kernel"] == enc.linear_kernel and "feature_encoder" not in enc.full_spec()
    assert enc.linear_kernel == packed_kernel(fused_gelus=2, model=enc.model)
    for text in TEXTS:
        tokens = hub.encode(text)
        out = enc.encode([enc.prepare(Utterance(id="t", text=text))])[0]
        with torch.inference_mode():
            refs = hub.extract_features(tokens, return_all_hiddens=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                theirs = hub.extract_features(tokens, return_all_hiddens=True)
        for k, (r, t) in enumerate(zip(refs, theirs)):
            r, t = r[0].numpy(), t[0].float().numpy()
            error = lambda a: float(np.linalg.norm(a - r) / np.linalg.norm(r))  # noqa: E731
            assert error(out[:, k]) < 1.3 * error(t) + 1e-6, (k, error(out[:, k]), error(t))


def test_long_text_is_chunked_and_each_window_equals_fairseq(roberta, hub):
    enc = build_encoder("text", {"backend": "fairseq", "path": roberta, "max_tokens": 16, "overlap": 4})
    text = " ".join(["the hen ate in the hall and then the hen slept"] * 4)
    ids = enc.prepare(Utterance(id="long", text=text))
    spans = enc._spans(len(ids))
    assert len(spans) >= 3
    out = enc.encode([ids])[0]
    assert out.shape == (len(ids) + 2, 32)  # every token kept, plus <s> and </s>
    refs = []
    for s, e in spans:
        tokens = torch.tensor(enc.prefix + ids[s:e].tolist() + enc.suffix)
        with torch.inference_mode():
            refs.append(hub.extract_features(tokens)[0].numpy())
    cuts = [(s1 + e0) // 2 for (_, e0), (s1, _) in zip(spans, spans[1:])]
    for k, (lo, hi) in enumerate(zip([0] + cuts, cuts + [len(ids)])):
        s = spans[k][0]
        assert maxdiff(out[1 + lo : 1 + hi], refs[k][1 + lo - s : 1 + hi - s], "roberta chunked") < TOL
    assert maxdiff(out[:1], refs[0][:1]) < TOL and maxdiff(out[-1:], refs[-1][-1:]) < TOL  # <s> first, </s> last


def test_roberta_errors(ckpt, tmp_path):
    import shutil

    folder = tmp_path / "rob"
    shutil.copytree(ckpt["roberta"], folder)
    with pytest.raises(UserError, match="encodes text, not audio"):
        build_encoder("audio", {"backend": "fairseq", "path": str(folder)})
    with pytest.raises(UserError, match="exceeds the model's limit of 40"):
        build_encoder("text", {"backend": "fairseq", "path": str(folder), "max_tokens": 64})
    (folder / "vocab.bpe").unlink()
    with pytest.raises(UserError, match="lacks vocab.bpe"):
        build_encoder("text", {"backend": "fairseq", "path": str(folder / "model.pt")})


# ---------------------------------------------------------------------------------------------
# what is refused


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_in_a_checkpoint_is_refused_unless_trusted(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    state = torch.load(ckpt["w2v2_group"], weights_only=False)
    state["extra_state"]["hook"] = Payload(marker)
    path = tmp_path / "pickled_code.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match="refers to io.open.*trust_checkpoint"):
        build_encoder("audio", {"backend": "fairseq", "path": str(path)})
    assert not marker.exists()

    # Plain data, but fairseq would eval() this layer spec: refused before fairseq sees it.
    state = torch.load(ckpt["w2v2_group"], weights_only=False)
    state["args"].conv_feature_layers = CONV.replace("* 2", f"* (2 + 0 * len(str(open({str(marker)!r}, 'w'))))")
    path = tmp_path / "eval_code.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match="conv_feature_layers.*not a plain layer list"):
        build_encoder("audio", {"backend": "fairseq", "path": str(path)})
    assert not marker.exists()
    enc = build_encoder("audio", {"backend": "fairseq", "path": str(path), "trust_checkpoint": True})
    assert marker.exists() and enc.dim == 32


def test_unsupported_and_broken_checkpoints(ckpt, tmp_path):
    state = torch.load(ckpt["w2v2_group"], weights_only=False)
    state["args"].arch = "transformer_lm"
    torch.save(state, tmp_path / "lm.pt")
    with pytest.raises(UserError, match="holds a 'transformer_lm' model; supported"):
        build_encoder("audio", {"backend": "fairseq", "path": str(tmp_path / "lm.pt")})

    state = torch.load(ckpt["w2v2_group"], weights_only=False)
    state["model"]["encoder.layers.1.fc1.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(UserError, match="do not match"):
        build_encoder("audio", {"backend": "fairseq", "path": str(tmp_path / "shape.pt")})

    state = torch.load(ckpt["w2v2_group"], weights_only=False)
    del state["model"]["encoder.layers.1.fc1.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(UserError, match="do not match.*encoder.layers.1.fc1.weight"):
        build_encoder("audio", {"backend": "fairseq", "path": str(tmp_path / "missing.pt")})

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a fairseq checkpoint"):
        build_encoder("audio", {"backend": "fairseq", "path": str(tmp_path / "other.pt")})


def test_fairseq_import_leaves_logging_alone_and_torchaudio_unloaded(fs):
    import subprocess

    code = (
        "import logging, sys\n"
        "from emofuse.extract.encoders.fairseq_backend import import_fairseq\n"
        "root = logging.getLogger(); before = (list(root.handlers), root.level)\n"
        "import_fairseq()\n"
        "assert (list(root.handlers), root.level) == before, (root.handlers, root.level)\n"
        "assert 'torchaudio' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "torchaudio" not in sys.modules  # nor after every test above, in this process
