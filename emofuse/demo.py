"""`emofuse demo`: the whole job on a generated corpus, as a recipe that reads like a script.

    generate corpus -> extract (audio, text, video) -> train ATV -> evaluate -> modality ablation
    -> predict one test clip from its MP4 and transcript, as a user would on a new video
"""

from __future__ import annotations

import time
from pathlib import Path

from emofuse.config import load_config
from emofuse.corpora import load_corpus
from emofuse.errors import UserError
from emofuse.extract.pipeline import extract_corpus
from emofuse.fuse.evaluate import ablation, evaluate_run
from emofuse.fuse.predict import format_prediction, predict_media
from emofuse.fuse.train import train

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def run_demo(out: Path, size: str = "full", seeds: int | None = None, progress: bool = True, log=print) -> dict:
    out = Path(out)
    overrides = [f"corpus.root={out / 'data'}", f"corpus.size={size}", f"extract.cache={out / 'cache'}",
                 f"train.runs={out / 'runs'}"]
    if seeds:
        overrides.append(f"train.seeds={seeds}")
    if not DEMO_CONFIG.exists():
        raise UserError(f"{DEMO_CONFIG} not found: run the demo from a checkout of emofuse (make demo)")
    cfg = load_config(DEMO_CONFIG, overrides)
    timings = {}

    t = time.perf_counter()
    corpus = load_corpus(cfg.corpus, progress=progress)
    timings["corpus"] = time.perf_counter() - t
    log(f"corpus: {len(corpus.utterances)} utterances in {cfg.corpus.root}")

    t = time.perf_counter()
    for r in extract_corpus(cfg, corpus, progress=progress, log=log):
        log(f"extract {r.modality}: encoded {r.encoded}, skipped {r.skipped}, failed {r.failed}")
    timings["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    train(cfg, progress=progress, log=log)
    timings["train"] = time.perf_counter() - t

    run = Path(cfg.train.runs) / cfg.train.name
    t = time.perf_counter()
    evaluate_run(run, log=log)
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    table = ablation(run, progress=progress, log=log)
    timings["ablation"] = time.perf_counter() - t

    log("stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        + f", total {sum(timings.values()):.1f}")
    rows = table["rows"]
    singles = {k: v["wa"]["mean"] for k, v in rows.items() if len(k) == 1}
    if "ATV" in rows and singles:
        best = max(singles, key=singles.get)
        gain = 100 * (rows["ATV"]["wa"]["mean"] - singles[best])
        log(f"ATV accuracy {100 * rows['ATV']['wa']['mean']:.1f} vs best single modality {best} "
            f"{100 * singles[best]:.1f}: {gain:+.1f} points")
    # One new clip, the way a user predicts: the MP4 (video + speech) and its transcript.
    clip = next(u for u in corpus.utterances if u.split == corpus.protocol.test_split)
    log(f"\n$ emofuse predict {run} {clip.video} --text {clip.text!r}")
    prediction = predict_media(run, clip.video, text=clip.text)
    log(format_prediction(prediction))
    log(f"true label: {clip.labels[corpus.protocol.label]}")
    log(f"reports in {run}: report.md, confusion.png, ablation.md, ablation.png")
    return {"timings": timings, "ablation": table, "prediction": prediction}
