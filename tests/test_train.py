"""The training loop on a small generated cache: resume after an interruption is exact, the run
folder holds what it promises (curves, no leftover resume state)."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from emofuse.cache.store import FeatureStore
from emofuse.config import load_config
from emofuse.corpora.base import Protocol, Utterance, write_utterances
from emofuse.extract.encoders.base import fingerprint
from emofuse.fuse import train as train_mod
from emofuse.fuse.train import RESUME_FILE, resume_run, train


@pytest.fixture()
def toy_run(tmp_path):
    """A 3-class toy corpus of 60 utterances whose audio and text features carry the label
    (weakly), and a config that trains the fast preset on it with dropout everywhere random."""
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    utts = [Utterance(id=f"u{i:02d}", speaker=f"s{i % 5}", split=["train", "train", "train", "dev", "test"][i % 5],
                      labels={"emotion": classes[i % 3]}) for i in range(60)]
    cache = tmp_path / "cache" / "toy"
    cache.mkdir(parents=True)
    write_utterances(utts, cache / "utterances.jsonl")
    (cache / "protocol.json").write_text(json.dumps(vars(Protocol("toy-3class", "emotion", classes=classes))))
    for m, dim in (("audio", 6), ("text", 4)):
        spec = {"backend": f"toy-{m}", "dim": dim}
        store = FeatureStore.create(cache / f"{m}-toy", m, spec, fingerprint(spec), dim=dim)
        with store.writer() as w:
            for i, u in enumerate(utts):
                x = rng.standard_normal((int(rng.integers(3, 10)), dim)).astype(np.float32)
                x[:, i % 3] += 1.0
                w.add(u.id, x)
        store.close()
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(f"""
corpus: {{name: toy, root: {tmp_path / 'no-corpus-here'}}}
extract: {{cache: {tmp_path / 'cache'}, encoders: {{audio: {{backend: toy-audio}}, text: {{backend: toy-text}}}}}}
model: {{modalities: [audio, text], preset: fast, width: 16, heads: 2, ffn: 32, dropout: 0.2,
        self_layers: {{audio: 1, text: 1}}, cross_layers: 1}}
train: {{runs: {tmp_path / 'runs'}, name: full, epochs: 6, patience: 6, batch_size: 8, lr: 0.003,
        modality_dropout: 0.3, num_threads: 1}}
""")
    return cfg


@pytest.mark.parametrize("overrides", [[], ["train.ema=0.9"], ["train.step_frames=20"]],
                         ids=["weights", "weight-average", "micro-batches"])
def test_interrupted_training_resumes_exactly(toy_run, monkeypatch, overrides):
    cfg = load_config(toy_run, overrides)
    full = train(cfg, progress=False, log=lambda *_: None)
    full_dir = Path(cfg.train.runs) / "full" / "seed-0"

    # The same training, interrupted right after its third epoch was saved (as a kill would leave it).
    cfg.train.name = "cut"
    real_save = train_mod.save_resume
    calls = []

    def save_then_die(*args, **kw):
        real_save(*args, **kw)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_resume", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, log=lambda *_: None)
    monkeypatch.setattr(train_mod, "save_resume", real_save)
    cut_dir = Path(cfg.train.runs) / "cut" / "seed-0"
    assert len(open(cut_dir / "metrics.jsonl").readlines()) == 3
    with open(cut_dir / "metrics.jsonl", "a") as f:  # a kill can land after the log line, before the checkpoint
        f.write('{"epoch": 3, "partial": true}\n')

    resumed = resume_run(cfg.train.runs + "/cut", progress=False, log=lambda *_: None)
    assert resumed["test"] == full["test"]
    a, b = load_file(full_dir / "model.safetensors"), load_file(cut_dir / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-exact on the CPU
    full_log = [json.loads(line) for line in open(full_dir / "metrics.jsonl")]
    cut_log = [json.loads(line) for line in open(cut_dir / "metrics.jsonl")]
    assert cut_log == full_log and len(cut_log) == 6
    assert not (cut_dir / RESUME_FILE).exists()  # the seed is done: no resume state left
    assert (cut_dir / "curves.png").stat().st_size > 1000


def test_resume_of_a_finished_run_does_no_training(toy_run, monkeypatch):
    cfg = load_config(toy_run)
    first = train(cfg, progress=False, log=lambda *_: None)
    # a seed finished by an earlier emofuse, whose result.json had no task or modalities
    done = Path(cfg.train.runs) / "full" / "seed-0" / "result.json"
    done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items()
                                if k not in ("task", "modalities")}))
    monkeypatch.setattr(train_mod, "fit", lambda *a, **k: pytest.fail("a finished seed was trained again"))
    again = resume_run(cfg.train.runs + "/full", progress=False, log=lambda *_: None)
    assert again["test"] == first["test"]


def test_robustness_table_and_plot(toy_run):
    from emofuse.fuse.evaluate import evaluate_run, robustness

    cfg = load_config(toy_run)
    cfg.train.seeds = 2
    train(cfg, progress=False, log=lambda *_: None)
    run = Path(cfg.train.runs) / "full"
    report = evaluate_run(run, log=lambda *_: None)
    assert set(report["ensemble"]) >= {"wa", "ua", "weighted_f1"}  # the 2 seeds as one model
    assert "The 2 seeds as one model" in (run / "report.md").read_text()
    table = robustness(run, levels=(0.0, 1.0, 50.0), log=lambda *_: None)
    assert table["metric"] == "wa" and table["seeds"] == 2 and set(table["rows"]) == {"audio", "text"}
    assert table["clean"] == report["test"]["wa"]  # clean = what evaluate reports
    for row in table["rows"].values():
        assert row["noise"]["0"] == table["clean"]  # zero noise changes nothing
    # drowning a modality in noise changes the answers (of the modality the model leans on: on 12
    # test utterances the other may leave the accuracy where it was)
    assert any(row["noise"]["50"] != table["clean"] for row in table["rows"].values())
    assert robustness(run, levels=(0.0, 1.0, 50.0), log=lambda *_: None) == table  # the same noise every time
    assert (run / "robustness.png").stat().st_size > 1000
    md = (run / "robustness.md").read_text()
    assert "| A |" in md and "| T |" in md and "noise 50" in md


def test_ensemble_averages_scores_or_probabilities():
    from emofuse.fuse.train import ensemble_outputs

    a, b = np.array([[1.0], [-2.0]]), np.array([[2.0], [0.0]])
    np.testing.assert_allclose(ensemble_outputs("regression", [a, b]), [[1.5], [-1.0]])

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    # probabilities, not logits, are averaged: a confident seed does not outvote two others by scale
    seeds = [np.array([[6.0, 0.0, 0.0]]), np.array([[0.0, 2.0, 0.0]]), np.array([[0.0, 2.0, 0.0]])]
    probs = ensemble_outputs("classification", seeds)
    np.testing.assert_allclose(probs, np.mean([softmax(s) for s in seeds], axis=0))
    assert probs.argmax() == 1 and np.mean(seeds, axis=0).argmax() == 0
    heads = ensemble_outputs("multilabel", [np.array([[0.0, 3.0, 1.0, 0.0]]), np.array([[0.0, 1.0, 2.0, 0.0]])])
    assert heads.shape == (1, 4)
    np.testing.assert_allclose(heads.reshape(-1, 2).sum(-1), 1.0)  # each head's (no, yes) pair
    assert heads.reshape(-1, 2).argmax(-1).tolist() == [1, 0]


def test_ablation_table_shows_the_papers_numbers_beside_ours():
    from emofuse.fuse.evaluate import ablation_markdown

    row = {k: {"mean": 0.5, "std": 0.01} for k in ("mae", "corr", "acc7", "acc2_has0", "acc2_non0", "f1_non0")}
    md = ablation_markdown({"protocol": "mosi-sentiment-regression", "task": "regression", "seeds": 5,
                            "rows": {"T": row, "ATV": row}})
    paper = md.strip().splitlines()[-1]
    assert paper.startswith("| SSE-FT paper, ATV")
    assert paper.split("|")[2:-1] == [" 0.776 ", " 0.768 ", " 46.5 ", " - ", " 83.9 ", " 83.5 "]
    other = ablation_markdown({"protocol": "demo-4class", "task": "classification", "seeds": 1,
                               "rows": {"ATV": {k: {"mean": 0.9, "std": 0.0} for k in ("wa", "ua", "weighted_f1")}}})
    assert "paper" not in other


def test_multilabel_heads_train_and_report(toy_run, tmp_path):
    """One 2-way head per class (IEMOCAP as the paper trained it; MOSEI's emotions): the same toy
    data as a multilabel protocol trains, and the report has per-emotion accuracy and F1."""
    from emofuse.fuse.evaluate import evaluate_run, summary_line
    from emofuse.fuse.predict import format_prediction
    from emofuse.fuse.train import outputs_to_predictions

    cache = tmp_path / "cache" / "toy"
    proto = json.loads((cache / "protocol.json").read_text())
    proto.update(name="toy-3class-binary", task="multilabel")
    (cache / "protocol.json").write_text(json.dumps(proto))
    cfg = load_config(toy_run)
    cfg.train.epochs = cfg.train.patience = 20
    summary = train(cfg, progress=False, log=lambda *_: None)
    assert summary["task"] == "multilabel"
    test = summary["test"]
    assert {"mean_acc", "mean_f1", "acc_a", "f1_a", "acc_c", "f1_c"} <= set(test)
    assert abs(test["mean_acc"]["mean"] - np.mean([test[f"acc_{c}"]["mean"] for c in "abc"])) < 1e-9
    assert test["mean_acc"]["mean"] > 0.7  # the labels are in the features: the heads learn them
    assert "acc_b" in summary_line(summary)
    report = evaluate_run(Path(cfg.train.runs) / "full", log=lambda *_: None)
    assert report["test"]["mean_f1"] == test["mean_f1"]
    # head e says yes when its second logit is larger
    out = np.array([[0.0, 1.0, 2.0, -1.0, 0.5, 0.4]])
    assert outputs_to_predictions("multilabel", out).tolist() == [[1, 0, 0]]
    line = format_prediction({"prediction": [], "probabilities": {"a": 0.2}, "protocol": "p", "seeds": 1,
                              "used": ["audio"], "missing": {}})
    assert "none of the emotions" in line


def test_tensorboard_logs_every_epoch(toy_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(toy_run)
    cfg.train.tensorboard = True
    train(cfg, progress=False, log=lambda *_: None)
    events = EventAccumulator(str(Path(cfg.train.runs) / "full" / "seed-0" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "dev/wa", "dev/weighted_f1"} <= set(events.Tags()["scalars"])
    losses = [e.value for e in events.Scalars("train/loss")]
    logged = [json.loads(line)["train_loss"] for line in open(Path(cfg.train.runs) / "full" / "seed-0" / "metrics.jsonl")]
    np.testing.assert_allclose(losses, logged, rtol=1e-6)


def test_learned_layer_weights_find_the_informative_layer(tmp_path):
    """An all-layer store (T, L, D) where only layer 2 carries the label: the softmax layer mix
    learns to weight layer 2 most, and the report shows the weights (table and PNG)."""
    from emofuse.fuse.evaluate import evaluate_run

    rng = np.random.default_rng(1)
    classes = ["a", "b"]
    utts = [Utterance(id=f"u{i:02d}", split=["train", "train", "train", "dev", "test"][i % 5],
                      labels={"emotion": classes[i % 2]}) for i in range(80)]
    cache = tmp_path / "cache" / "toy"
    cache.mkdir(parents=True)
    write_utterances(utts, cache / "utterances.jsonl")
    (cache / "protocol.json").write_text(json.dumps(vars(Protocol("toy-layers", "emotion", classes=classes))))
    spec = {"backend": "toy-layers", "layers": "all"}
    store = FeatureStore.create(cache / "audio-toy", "audio", spec, fingerprint(spec), dim=4, layers=4)
    with store.writer() as w:
        for i, u in enumerate(utts):
            x = rng.standard_normal((6, 4, 4)).astype(np.float32)
            x[:, 2, 0] += 2.0 if i % 2 else -2.0
            w.add(u.id, x)
    store.close()
    cfg = tmp_path / "layers.yaml"
    cfg.write_text(f"""
corpus: {{name: toy, root: {tmp_path / 'none'}}}
extract: {{cache: {tmp_path / 'cache'}, encoders: {{audio: {{backend: toy-layers}}}}}}
model: {{modalities: [audio], preset: fast, width: 8, heads: 2, ffn: 16, self_layers: {{audio: 1}}, cross_layers: 0}}
train: {{runs: {tmp_path / 'runs'}, name: layers, epochs: 15, patience: 15, batch_size: 8, lr: 0.01, num_threads: 1}}
""")
    train(load_config(cfg), progress=False, log=lambda *_: None)
    run = tmp_path / "runs" / "layers"
    report = evaluate_run(run, log=lambda *_: None)
    weights = report["layer_weights"]["audio"]
    assert len(weights) == 4 and abs(sum(weights) - 1) < 1e-5
    assert int(np.argmax(weights)) == 2, weights
    assert "Learned audio layer weights" in (run / "report.md").read_text()
    assert (run / "layer_weights.png").stat().st_size > 1000


def test_seeds_in_processes_give_the_numbers_of_one_by_one(toy_run):
    cfg = load_config(toy_run, ["train.seeds=2", "train.epochs=3"])
    one_by_one = train(cfg, progress=False, log=lambda *_: None)
    cfg.train.name, cfg.train.workers = "parallel", 2
    parallel = train(cfg, progress=False, log=lambda *_: None)
    assert parallel == one_by_one
    for seed in (0, 1):
        a = load_file(Path(cfg.train.runs) / "full" / f"seed-{seed}" / "model.safetensors")
        b = load_file(Path(cfg.train.runs) / "parallel" / f"seed-{seed}" / "model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_folds_pooled_and_in_processes_the_same(tmp_path):
    # A small Emo-DB-shaped corpus (3 speakers, every emotion twice, tones whose pitch follows the
    # emotion) through opensmile and leave-one-speaker-out training, one fold at a time and 2 at once.
    import soundfile as sf

    from emofuse.corpora import load_corpus
    from emofuse.extract.pipeline import extract_corpus
    from emofuse.fuse.train import train_folds

    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    for speaker in ("03", "08", "10"):
        for k, code in enumerate("WLEAFTN"):
            for version in "ab":
                tone = 0.1 * np.sin(2 * np.pi * (150 + 40 * k) * t) + 0.01 * rng.standard_normal(len(t))
                (tmp_path / "emodb" / "wav").mkdir(parents=True, exist_ok=True)
                sf.write(tmp_path / "emodb" / "wav" / f"{speaker}a0{k}{code}{version}.wav", tone, 16000)
    cfg_file = tmp_path / "emodb.yaml"
    cfg_file.write_text(f"""
corpus: {{name: emodb, root: {tmp_path / 'emodb'}, protocol: loso}}
extract: {{cache: {tmp_path / 'cache'}, encoders: {{audio: {{backend: opensmile}}}}}}
model: {{modalities: [audio], width: 16, heads: 2, ffn: 32, self_layers: {{audio: 1}}}}
train: {{runs: {tmp_path / 'runs'}, name: serial, epochs: 2, batch_size: 8, seeds: 2, num_threads: 1}}
""")
    cfg = load_config(cfg_file)
    extract_corpus(cfg, load_corpus(cfg.corpus), progress=False, log=lambda *_: None)
    serial = train_folds(cfg, progress=False, log=lambda *_: None)
    assert serial["folds"] == ["03", "08", "10"] and serial["seeds"] == [0, 1]
    # pooled: each seed's metrics are over all 42 utterances, every fold's test speaker once
    preds = [json.loads((Path(cfg.train.runs) / "serial" / f"fold-{f}" / "seed-0" / "predictions.json").read_text())
             for f in serial["folds"]]
    assert sorted(i for p in preds for i in p["ids"]) == sorted(p.stem for p in (tmp_path / "emodb" / "wav").glob("*.wav"))
    cfg.train.name, cfg.train.workers = "parallel", 2
    assert train_folds(cfg, progress=False, log=lambda *_: None) == serial
    # evaluate scores a cross-validated run as training did (folds pooled per seed), and adds the
    # seeds as one model and the confusion matrix
    from emofuse.fuse.evaluate import evaluate_run

    report = evaluate_run(Path(cfg.train.runs) / "serial", log=lambda *_: None)
    assert report["test"] == serial["test"] and report["n_test"] == 42
    assert report["protocol"] == serial["protocol"] and set(report["ensemble"]) >= {"wa", "ua"}
    assert (Path(cfg.train.runs) / "serial" / "confusion.png").exists()


def test_balanced_class_weights_and_the_selection_metric(toy_run):
    from emofuse.errors import UserError
    from emofuse.fuse.train import balanced_class_weights

    w = balanced_class_weights([0, 0, 0, 1], 3)  # 4 / (3 x count); class 2 never seen in train
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])
    cfg = load_config(toy_run, ["train.epochs=2", "train.class_weights=balanced", "train.select_metric=ua"])
    summary = train(cfg, progress=False, log=lambda *_: None)
    result = json.loads((Path(cfg.train.runs) / "full" / "seed-0" / "result.json").read_text())
    assert result["primary"] == "ua" and result["dev"]["ua"] == max(
        json.loads(line)["dev"]["ua"] for line in open(Path(cfg.train.runs) / "full" / "seed-0" / "metrics.jsonl"))
    assert "ua" in summary["test"]
    with pytest.raises(UserError, match="'mae' is not a classification metric; choose one of wa, ua"):
        train(load_config(toy_run, ["train.select_metric=mae"]), progress=False, log=lambda *_: None)
    with pytest.raises(UserError, match="class_weights must be none or balanced"):
        load_config(toy_run, ["train.class_weights=inverse"])


def test_feature_augmentation_noise_and_time_mask():
    import torch

    from emofuse.fuse.train import augment

    gen = torch.Generator().manual_seed(0)
    x = {"audio": torch.ones(3, 20, 4), "text": torch.ones(3, 6, 2, 5)}  # text: (B, T, L, D)
    lengths = torch.tensor([20, 10, 1])
    masks = {m: torch.arange(v.shape[1])[None] < lengths[:, None].clamp(max=v.shape[1]) for m, v in x.items()}
    x = {m: v * masks[m].reshape(*masks[m].shape, *[1] * (v.dim() - 2)) for m, v in x.items()}  # zero padding
    assert augment(x, masks, 0.0, 0.0, gen) is x  # off: untouched
    noisy = augment(x, masks, 0.5, 0.0, gen)
    for m in x:
        pad = ~masks[m]
        assert (noisy[m][pad] == 0).all() and (noisy[m][masks[m]] != 1).all()  # every real frame, no padding
        assert 0.3 < (noisy[m] - x[m])[masks[m]].std() < 0.7
    for _ in range(20):
        cut = augment(x, masks, 0.0, 0.5, gen)["audio"][..., 0]
        for b, n in enumerate(lengths.tolist()):
            zeros = (cut[b, :n] == 0).nonzero().flatten()
            assert len(zeros) <= 0.5 * n  # at most half of the real frames, in one span
            if len(zeros):
                assert zeros.tolist() == list(range(zeros[0], zeros[0] + len(zeros)))
            assert (cut[b, n:] == 0).all()
    spans = [(augment(x, masks, 0.0, 0.5, gen)["audio"][0] == 0).all(-1).sum().item() for _ in range(50)]
    assert max(spans) > 5  # long spans happen (up to 10 of sample 0's 20 frames)
    with pytest.raises(Exception, match="time_mask must be"):
        load_config(None, ["train.time_mask=1.5"])


def test_correlation_loss_adds_one_minus_pearson_r(toy_run):
    import torch
    import torch.nn.functional as F

    from emofuse.errors import UserError
    from emofuse.fuse.train import loss_fn, pearson

    y = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    assert float(pearson(3 * y + 1, y)) == pytest.approx(1.0)
    assert float(pearson(-y, y)) == pytest.approx(-1.0)
    assert float(pearson(torch.zeros(5), y)) == 0.0  # a constant prediction: no NaN
    pred = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.4], requires_grad=True)
    plain = loss_fn("regression", pred[:, None], y)
    assert float(plain) == pytest.approx(float(F.l1_loss(pred, y)))
    both = loss_fn("regression", pred[:, None], y, corr_weight=0.5)
    assert float(both) == pytest.approx(float(plain) + 0.5 * (1 - float(pearson(pred, y))))
    # the r term alone pulls the predictions towards the targets' ordering: descent lowers the lowest target's, raises the highest's
    (grad,) = torch.autograd.grad(both - plain, pred)
    assert grad[0] > 0 and grad[-1] < 0

    with pytest.raises(UserError, match="corr_loss is for regression protocols"):
        train(load_config(toy_run, ["train.corr_loss=0.5"]), progress=False, log=lambda *_: None)
    with pytest.raises(UserError, match="corr_loss"):
        load_config(toy_run, ["train.corr_loss=-1"])


@pytest.mark.parametrize("task", ["classification", "multilabel", "regression"])
def test_micro_batches_give_the_gradient_of_the_whole_batch(task):
    """train.step_frames: a batch of 7 samples x 12 padded frames under a budget of 36 frames runs as
    micro-batches of 3, 3 and 1; loss and gradients equal those of the whole batch in one step
    (dropout off), class weights included. corr_loss, a whole-batch correlation, is refused with it."""
    import copy

    import torch

    from emofuse.errors import UserError
    from emofuse.fuse.model import SSEFT, FusionConfig
    from emofuse.fuse.train import train_step

    dims = {"audio": 6, "text": 5}
    outputs = {"classification": 4, "multilabel": 2 * 3, "regression": 1}[task]
    cfg = FusionConfig(modalities=list(dims), input_dims=dims, num_layers_in={}, num_outputs=outputs,
                       width=16, heads=2, ffn=32, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    whole = SSEFT(cfg).train()
    split = copy.deepcopy(whole)
    g = torch.Generator().manual_seed(1)
    lengths = {"audio": [12, 9, 12, 5, 11, 12, 7], "text": [4, 6, 3, 6, 2, 5, 6]}
    feats = {m: torch.randn(7, max(n), dims[m], generator=g) for m, n in lengths.items()}
    masks = {m: torch.arange(max(n))[None] < torch.tensor(n)[:, None] for m, n in lengths.items()}
    present = torch.ones(7, 2, dtype=torch.bool)
    present[2, 1] = False  # one sample without text
    weights = None
    if task == "classification":
        y, weights = torch.tensor([0, 1, 3, 3, 2, 0, 3]), torch.tensor([0.5, 2.0, 1.0, 0.25])
    elif task == "multilabel":
        y = torch.randint(0, 2, (7, 3), generator=g)
    else:
        y = torch.randn(7, generator=g)

    forwards = []
    split.register_forward_pre_hook(lambda module, args: forwards.append(len(args[2])))
    loss_whole = train_step(whole, feats, masks, present, y, task, weights)
    loss_split = train_step(split, feats, masks, present, y, task, weights, step_frames=36)
    assert forwards == [3, 3, 1]
    assert loss_split == pytest.approx(loss_whole, rel=1e-6)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name

    forwards.clear()
    train_step(split, feats, masks, present, y, task, weights, step_frames=7 * 12)  # fits: one step
    assert forwards == [7]
    with pytest.raises(UserError, match="step_frames"):
        load_config(None, ["train.step_frames=100", "train.corr_loss=0.5"])


def test_weight_average_is_what_is_validated_and_kept(toy_run):
    import torch

    from emofuse.errors import UserError
    from emofuse.fuse.train import WeightAverage

    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.75)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    average.update(model)
    assert torch.allclose(average.state["weight"], start + 1.0)  # a quarter of the way
    with average.swapped_into(model):
        assert torch.equal(model.weight, start + 1.0)
    assert torch.equal(model.weight, start + 4.0)  # the model's own weights again

    # the kept model is the average: other weights, other test answers than without it
    plain = train(load_config(toy_run, ["train.epochs=4"]), progress=False, log=lambda *_: None)
    cfg = load_config(toy_run, ["train.epochs=4", "train.ema=0.9", "train.name=ema"])
    averaged = train(cfg, progress=False, log=lambda *_: None)
    kept = load_file(Path(cfg.train.runs) / "ema" / "seed-0" / "model.safetensors")
    first = load_file(Path(cfg.train.runs) / "full" / "seed-0" / "model.safetensors")
    assert any(not torch.equal(kept[k], first[k]) for k in kept)  # same seed: only the average differs
    assert set(averaged["test"]) == set(plain["test"])
    with pytest.raises(UserError, match="train.ema"):
        load_config(toy_run, ["train.ema=1.0"])


def test_keep_last_tests_the_weights_of_the_final_epoch(toy_run):
    from emofuse.errors import UserError
    from emofuse.fuse.train import evaluate_split, load_data, load_model

    # patience 1 would stop a keep=best run early; keep=last trains every epoch and keeps the end
    cfg = load_config(toy_run, ["train.epochs=5", "train.patience=1", "train.keep=last", "train.name=last"])
    train(cfg, progress=False, log=lambda *_: None)
    run_dir = Path(cfg.train.runs) / "last" / "seed-0"
    result = json.loads((run_dir / "result.json").read_text())
    log = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert len(log) == result["epochs_run"] == 5 and result["best_epoch"] == 4
    assert result["dev"]["weighted_f1"] == log[-1]["dev"]["weighted_f1"]
    # the saved model is the last epoch's: it scores on dev what that epoch logged
    data = load_data(cfg)
    targets = data.targets()
    dev_ids = [i for i in data.split_ids("dev") if i in targets]
    model, normalizer = load_model(run_dir)
    dev = evaluate_split(model, data, dev_ids, targets, normalizer, cfg.train.max_frames)
    assert dev["weighted_f1"] == pytest.approx(log[-1]["dev"]["weighted_f1"])
    assert dev["wa"] == pytest.approx(log[-1]["dev"]["wa"])
    with pytest.raises(UserError, match="train.keep must be best or last"):
        load_config(toy_run, ["train.keep=final"])


def test_unfrozen_top_layers_start_from_the_encoder_and_train_from_the_cache(tmp_path, monkeypatch):
    """model.unfreeze_top on a cache made by a real (tiny) BERT with `layer: all`: the text stream
    starts with the encoder's own top layer, which turns the cached state below it into the cached
    last layer; those weights train at train.unfrozen_lr (0 leaves them exactly as loaded); text is
    fed raw, not standardised; the saved run reloads and scores what training reported."""
    import torch

    from emofuse.errors import UserError
    from emofuse.extract.encoders.base import build_encoder
    from emofuse.fuse.model import SSEFT
    from emofuse.fuse.train import evaluate_split, fusion_config, load_data, load_model, unfrozen_layers
    from tests.test_encoders import tiny_text_model

    folder = tiny_text_model(tmp_path / "bert")
    encoder = build_encoder("text", {"backend": "hf", "path": folder, "layer": "all"})
    rng = np.random.default_rng(0)
    good, bad = ["good", "great", "happy", "fine"], ["bad", "awful", "sad", "poor"]
    utts, cache = [], tmp_path / "cache" / "toy"
    cache.mkdir(parents=True)
    for i in range(50):
        score = float(rng.uniform(-3, 3))
        words = [str(w) for w in rng.choice(good if score > 0 else bad, size=int(rng.integers(2, 6)))]
        utts.append(Utterance(id=f"u{i:02d}", speaker=f"s{i % 4}", text=" ".join(words), labels={"sentiment": score},
                              split=["train", "train", "train", "dev", "test"][i % 5]))
    write_utterances(utts, cache / "utterances.jsonl")
    (cache / "protocol.json").write_text(json.dumps(vars(Protocol("toy-score", "sentiment", task="regression"))))
    spec = encoder.full_spec()
    store = FeatureStore.create(cache / "text-tiny", "text", spec, fingerprint(spec), dim=32, layers=3)
    with store.writer() as w:
        for u, x in zip(utts, encoder.encode([encoder.prepare(u) for u in utts])):
            w.add(u.id, x)
    store.close()
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(f"""
corpus: {{name: toy, root: {tmp_path / 'none'}}}
extract: {{cache: {tmp_path / 'cache'}, encoders: {{text: {{backend: hf, path: {folder}, layer: all}}}}}}
model: {{modalities: [text], preset: fast, width: 16, heads: 2, ffn: 32, self_layers: {{text: 0}},
        unfreeze_top: {{text: 1}}}}
train: {{runs: {tmp_path / 'runs'}, name: top, epochs: 3, patience: 3, batch_size: 8, lr: 0.003,
        unfrozen_lr: 0.001, num_threads: 1}}
""")
    cfg = load_config(cfg_path)
    data = load_data(cfg)
    shape, weights = unfrozen_layers(cfg, ["text"])["text"]
    model = SSEFT(fusion_config(cfg, data, {"text": shape})).eval()
    model.streams["text"].encoder_top.load_state_dict(weights)
    assert model.streams["text"].layer_logits is None  # the encoder's layers replace the layer mix
    x = torch.from_numpy(data.features["text"]["u00"].astype(np.float32))[None]
    with torch.no_grad():
        top = model.streams["text"].encoder_top[0](x[:, :, 1], torch.ones(1, x.shape[1], dtype=torch.bool))
    assert (top - x[:, :, 2]).abs().max() < 0.01  # the cache holds float16
    opt = train_mod.adamw(model, lr=0.003, weight_decay=0.01, unfrozen_lr=0.001)
    assert [g["lr"] for g in opt.param_groups] == [0.003, 0.001]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in model.streams["text"].encoder_top.parameters()}

    def trained_top(name: str, unfrozen_lr: float) -> dict:
        train(load_config(cfg_path, [f"train.name={name}", f"train.unfrozen_lr={unfrozen_lr}"]),
              progress=False, log=lambda *_: None)
        run_dir = tmp_path / "runs" / name / "seed-0"
        assert not any(k.startswith("text") for k in load_file(run_dir / "normalizer.safetensors"))
        model, normalizer = load_model(run_dir)
        result = json.loads((run_dir / "result.json").read_text())
        targets = data.targets()
        test = evaluate_split(model, data, [u.id for u in utts if u.split == "test"], targets, normalizer, 0)
        assert test["mae"] == pytest.approx(result["test"]["mae"])
        return model.streams["text"].encoder_top[0].state_dict()

    still = trained_top("frozen", 0.0)
    assert all(torch.equal(still[k], weights[f"0.{k}"]) for k in still)
    moved = trained_top("trained", 0.001)
    assert any(not torch.allclose(moved[k], weights[f"0.{k}"]) for k in moved)

    # interrupted after its first epoch and resumed: the same weights, both optimizer groups restored
    real_save = train_mod.save_resume

    def save_then_die(*args, **kw):
        real_save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_resume", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(cfg_path, ["train.name=cut"]), progress=False, log=lambda *_: None)
    monkeypatch.setattr(train_mod, "save_resume", real_save)
    resume_run(str(tmp_path / "runs" / "cut"), progress=False, log=lambda *_: None)
    a = load_file(tmp_path / "runs" / "trained" / "seed-0" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "cut" / "seed-0" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(UserError, match="cache every layer"):
        fusion_config(load_config(cfg_path, ["model.unfreeze_top.text=3"]), data, {"text": shape})
    with pytest.raises(UserError, match="speaker_norm standardises every modality"):
        train(load_config(cfg_path, ["train.speaker_norm=true", "train.name=spk"]), progress=False, log=lambda *_: None)
