"""Linear-probe baseline on the real data in ../shared/data: the floor emofuse's fusion model must beat.

Read from the data folder (never copied); skipped with a message when it is absent.
  MELD        mean-pooled all-MiniLM-L6-v2 sentence embeddings (emofuse's `minilm` encoder, token
              states of the last layer, [CLS] and [SEP] included, averaged: sentence-transformers'
              mean pooling) + scikit-learn LogisticRegression; trained on train, scored on the
              official test split: weighted F1 and accuracy, 7 emotions and 3 sentiments.
  CMU-MOSI    the same embeddings + Ridge regression of the [-3, 3] score on the standard folds
              (emofuse.corpora.cmu); metrics from emofuse.fuse.metrics.regression_metrics:
              Acc-2 (non0 and has0), F1, MAE, Pearson r, Acc-7.
  Emo-DB      eGeMAPSv02 functionals (88 per utterance, opensmile, audio resampled to 16 kHz by
              emofuse.extract.media) + LogisticRegression, leave one speaker out over the 10
              speakers, predictions pooled: WA (accuracy) and UA (mean per-class recall).
The text embeddings go through emofuse.extract.pipeline.extract_modality into a feature store in a
temporary folder (or --cache DIR, kept and reused: a second run does no encoder work).
Features are standardised with training statistics. The regularisation strength is chosen on the
dev split from a small grid (LogisticRegression C by weighted F1, Ridge alpha by MAE; Emo-DB: on
the fold's dev speaker, then refit on the nine non-test speakers); the test split is used once.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "probe"
DEFAULT_DATA = common.ROOT.parent / "shared" / "data"
FLOORS = {  # measured earlier on this machine (issue 6)
    "meld-emotion": {"weighted_f1": 55.7, "accuracy": 60.5},
    "meld-sentiment": {"weighted_f1": 65.0},
    "mosi": {"acc2_non0": 77.7, "mae": 1.051, "corr": 0.703, "acc7": 25.7},
    "emodb": {"wa": 64.1, "ua": 61.1},
}


def sentence_embeddings(utts, cache_dir: Path, log) -> tuple[dict, dict]:
    """id -> mean-pooled MiniLM token states, through the real pipeline and store."""
    import numpy as np

    from emofuse.cache.store import FeatureStore
    from emofuse.extract.encoders.base import build_encoder
    from emofuse.extract.pipeline import extract_modality

    enc = build_encoder("text", {"backend": "minilm", "device": "cpu"})
    start = time.perf_counter()
    res = extract_modality(utts, enc, cache_dir, budget=8192, progress=False, log=log)
    seconds = time.perf_counter() - start
    store = FeatureStore(Path(res.store))
    emb = {uid: store.get(uid).astype(np.float32).mean(0) for uid in store.ids()}
    store.close()
    return emb, {"encoded": res.encoded, "skipped": res.skipped, "failed": res.failed, "seconds": seconds}


def matrix(utts, emb, dim: int):
    """Rows for every utterance; one whose text could not be encoded (none in these files) gets zeros."""
    import numpy as np

    missing = sum(u.id not in emb for u in utts)
    return np.stack([emb.get(u.id, np.zeros(dim, np.float32)) for u in utts]), missing


C_GRID = (0.01, 0.1, 1.0, 10.0)  # LogisticRegression, chosen on the dev split (weighted F1)
ALPHA_GRID = (1.0, 10.0, 100.0, 1000.0)  # Ridge, chosen on the dev split (MAE)


def logreg(C: float = 1.0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))


def ridge(alpha: float = 1.0):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), Ridge(alpha=alpha))


def choose_c(xtr, ytr, xdev, ydev) -> tuple[float, dict]:
    from sklearn.metrics import f1_score

    scores = {C: f1_score(ydev, logreg(C).fit(xtr, ytr).predict(xdev), average="weighted") for C in C_GRID}
    return max(scores, key=scores.get), {str(k): 100 * v for k, v in scores.items()}


def probe_meld(root: Path, cache: Path, log) -> dict:
    from emofuse.corpora import meld
    from emofuse.fuse.metrics import classification_metrics

    out = {}
    corpus = meld.load(root, "emotion")
    emb, ext = sentence_embeddings(corpus.utterances, cache / "meld", log)
    dim = len(next(iter(emb.values())))
    for protocol in ("emotion", "sentiment"):
        corpus = meld.load(root, protocol)
        p = corpus.protocol
        train, dev, test = (corpus.split(s) for s in (p.train_split, p.dev_split, p.test_split))
        xtr, m1 = matrix(train, emb, dim)
        xdev, m2 = matrix(dev, emb, dim)
        xte, m3 = matrix(test, emb, dim)
        ytr, ydev, yte = ([p.classes.index(u.labels[p.label]) for u in us] for us in (train, dev, test))
        C, dev_scores = choose_c(xtr, ytr, xdev, ydev)
        m = classification_metrics(yte, logreg(C).fit(xtr, ytr).predict(xte), p.classes)
        out[f"meld-{protocol}"] = {"protocol": p.name, "n_train": len(train), "n_dev": len(dev), "n_test": len(test),
                                   "missing_embeddings": m1 + m2 + m3, "C": C, "dev_weighted_f1_by_C": dev_scores,
                                   "weighted_f1": 100 * m["weighted_f1"], "accuracy": 100 * m["wa"], "ua": 100 * m["ua"]}
        log(f"[probe]   MELD {protocol}: weighted F1 {100 * m['weighted_f1']:.1f}, accuracy {100 * m['wa']:.1f}")
    out["meld-extraction"] = ext
    return out


def probe_mosi(root: Path, cache: Path, log) -> dict:
    import numpy as np

    from emofuse.corpora import cmu
    from emofuse.fuse.metrics import regression_metrics

    corpus = cmu.load(root, name="mosi")
    labelled = [u for u in corpus.utterances if u.split in ("train", "dev", "test")]
    emb, ext = sentence_embeddings(labelled, cache / "mosi", log)
    dim = len(next(iter(emb.values())))
    train, dev, test = ([u for u in labelled if u.split == s] for s in ("train", "dev", "test"))
    (xtr, m1), (xdev, m2), (xte, m3) = (matrix(us, emb, dim) for us in (train, dev, test))
    ytr, ydev, yte = (np.array([u.labels["sentiment"] for u in us]) for us in (train, dev, test))
    dev_mae = {a: float(np.mean(np.abs(ridge(a).fit(xtr, ytr).predict(xdev) - ydev))) for a in ALPHA_GRID}
    alpha = min(dev_mae, key=dev_mae.get)
    m = regression_metrics(yte, ridge(alpha).fit(xtr, ytr).predict(xte))
    log(f"[probe]   MOSI: Acc-2 non0 {100 * m['acc2_non0']:.1f}, MAE {m['mae']:.3f}, r {m['corr']:.3f}")
    return {"mosi": {"protocol": corpus.protocol.name, "folds": "CMU-MultimodalSDK standard", "n_train": len(train),
                     "n_dev": len(dev), "n_test": len(test), "missing_embeddings": m1 + m2 + m3, "alpha": alpha,
                     "dev_mae_by_alpha": {str(k): v for k, v in dev_mae.items()},
                     "acc2_non0": 100 * m["acc2_non0"], "f1_non0": 100 * m["f1_non0"],
                     "acc2_has0": 100 * m["acc2_has0"], "f1_has0": 100 * m["f1_has0"],
                     "mae": m["mae"], "corr": m["corr"], "acc7": 100 * m["acc7"], "acc5": 100 * m["acc5"]},
            "mosi-extraction": ext}


def probe_emodb(root: Path, log, quick: bool = False) -> dict:
    import numpy as np
    import opensmile
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    from emofuse.corpora import emodb

    corpus = emodb.load(root)
    utts = corpus.utterances[::3] if quick else corpus.utterances
    smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02, feature_level=opensmile.FeatureLevel.Functionals)
    start = time.perf_counter()
    # Functionals of each file as it is (22.05 kHz here): opensmile reads and handles the rate itself.
    x = np.stack([smile.process_file(u.audio).to_numpy()[0] for u in utts])
    feat_s = time.perf_counter() - start
    classes = corpus.protocol.classes
    y = np.array([classes.index(u.labels["emotion"]) for u in utts])
    speakers = np.array([u.speaker for u in utts])
    order = sorted(set(speakers))

    def loso(features):
        pred, chosen = np.empty_like(y), {}
        for k, s in enumerate(order):
            # as emofuse.corpora.emodb's fold: dev = the next speaker; C chosen on it, then refit on all 9
            test, dev = speakers == s, speakers == order[(k + 1) % len(order)]
            train = ~test & ~dev
            C, _ = choose_c(features[train], y[train], features[dev], y[dev])
            chosen[s] = C
            pred[test] = logreg(C).fit(features[~test], y[~test]).predict(features[test])
        return accuracy_score(y, pred), balanced_accuracy_score(y, pred), chosen

    wa, ua, chosen = loso(x)
    # The same with each speaker's functionals standardised by that speaker's own statistics (labels
    # unused), as emofuse's train.speaker_norm does: the fair floor for a speaker-normalised model.
    x_spk = x.copy()
    for s in order:
        mine = speakers == s
        x_spk[mine] = (x[mine] - x[mine].mean(0)) / (x[mine].std(0) + 1e-6)
    wa_spk, ua_spk, _ = loso(x_spk)
    log(f"[probe]   Emo-DB: WA {100 * wa:.1f}, UA {100 * ua:.1f}; speaker-normalised WA {100 * wa_spk:.1f}, "
        f"UA {100 * ua_spk:.1f}")
    return {"emodb": {"protocol": "emodb leave-one-speaker-out, 10 folds, pooled", "n": len(y), "features": x.shape[1],
                      "feature_set": "eGeMAPSv02 functionals", "wa": 100 * wa, "ua": 100 * ua, "C_by_test_speaker": chosen,
                      "wa_speaker_norm": 100 * wa_spk, "ua_speaker_norm": 100 * ua_spk, "feature_seconds": feat_s}}


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder (read only)")
    p.add_argument("--cache", default=None, help="keep the text feature stores here and reuse them")
    args = p.parse_args(argv)
    data_dir = Path(args.data)
    if not data_dir.is_dir():
        msg = f"probe: skipped: the real-data folder {data_dir} is absent"
        print(msg)
        common.write_result(NAME, {"quick": args.quick, "skipped": msg}, args.out)
        return {"skipped": msg}
    threads = common.setup_threads(args.threads)
    log = common.log
    results = {}
    start = time.perf_counter()
    with common.temp_dir(args.tmp, NAME, keep=bool(args.cache)) as tmp:
        cache = Path(args.cache) if args.cache else tmp
        if args.quick:
            results["note"] = "quick: Emo-DB only, every third file (no text encoder pass over MELD and MOSI)"
        else:
            for name, fn in (("meld", lambda: probe_meld(data_dir / "meld", cache, log)),
                             ("mosi", lambda: probe_mosi(data_dir / "mosi", cache, log))):
                if (data_dir / name).is_dir():
                    log(f"[probe] {name}")
                    results.update(fn())
                else:
                    log(f"[probe] {name}: skipped ({data_dir / name} absent)")
        if (data_dir / "emodb").is_dir():
            log("[probe] emodb")
            results.update(probe_emodb(data_dir / "emodb", log, args.quick))
    total = time.perf_counter() - start

    rows = []

    def row(task, metric, key, scale=""):
        r = results.get(task)
        if r is None:
            return
        v, floor = r[key], FLOORS[task].get(key)
        rows.append([task, metric, r["n_test"] if "n_test" in r else r["n"], v, floor,
                     None if floor is None else f"{v - floor:+.3f}" if key in ("mae", "corr") else f"{v - floor:+.1f}"])

    row("meld-emotion", "weighted F1", "weighted_f1")
    row("meld-emotion", "accuracy", "accuracy")
    row("meld-sentiment", "weighted F1", "weighted_f1")
    row("meld-sentiment", "accuracy", "accuracy")
    for key, name in (("acc2_non0", "Acc-2 non0"), ("f1_non0", "F1 non0"), ("acc2_has0", "Acc-2 has0"),
                      ("f1_has0", "F1 has0"), ("mae", "MAE"), ("corr", "Pearson r"), ("acc7", "Acc-7")):
        row("mosi", name, key)
    row("emodb", "WA", "wa")
    row("emodb", "UA", "ua")
    data = {"quick": args.quick, "threads": threads, "data": str(data_dir), "seconds": total, "floors": FLOORS,
            "results": results}
    path = common.write_result(NAME, data, args.out)
    print(common.table(rows, ["task", "metric", "n test", "probe", "floor (issue 6)", "diff"],
                       f"Linear probe on {data_dir} ({total:.0f} s){' [QUICK: Emo-DB only]' if args.quick else ''}"))
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
