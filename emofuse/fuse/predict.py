"""One new media file -> emotion, with the run's own extraction settings.

The run's config names the encoders; their full specs must give the same fingerprints the model
was trained on, or we refuse (features from other settings would be silently wrong). Modalities
that cannot be extracted (no face, no speech, no transcript) are left out and the model
predicts from the others, as it does for missing modalities at training time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from emofuse.cache.store import spec_differences
from emofuse.corpora.base import Utterance
from emofuse.errors import PrepareError, UserError
from emofuse.extract.encoders.base import build_encoder, fingerprint
from emofuse.fuse.data import collate
from emofuse.fuse.evaluate import load_run_config, seed_dirs
from emofuse.fuse.train import ensemble_outputs, load_model


def extract_one(utt: Utterance, encoders: dict[str, dict], trained: dict) -> tuple[dict, dict]:
    """Features of one utterance per modality the model uses, and why any modality is missing."""
    features, missing = {}, {}
    for m, fp in trained["fingerprints"].items():
        encoder = build_encoder(m, encoders[m])
        spec = encoder.full_spec()
        if fingerprint(spec) != fp:
            diff = "; ".join(spec_differences(trained["encoders"][m], spec))
            raise UserError(f"{m} encoder settings differ from the run's (fingerprint {fingerprint(spec)[:12]} vs "
                            f"{fp[:12]}: {diff})")
        try:
            item = encoder.prepare(utt)
            features[m] = encoder.encode([item])[0].astype(np.float16)  # as the cache stores them
        except PrepareError as e:
            missing[m] = f"{e.stage}: {e.reason}"
    return features, missing


def predict_media(run: Path, media: str | None = None, text: str | None = None, audio: str | None = None,
                  video: str | None = None) -> dict:
    """`media` is an audio-visual file used for both audio and video; `audio`/`video` override it."""
    run = Path(run)
    cfg = load_run_config(run)
    if cfg.train.speaker_norm:
        raise UserError(f"{run} was trained with train.speaker_norm (features standardised per speaker): "
                        f"one clip of an unknown speaker cannot be standardised that way; use a run without it")
    for p in (media, audio, video):
        if p is not None and not Path(p).is_file():
            raise UserError(f"media file not found: {p}")
    utt = Utterance(id="input", text=text, audio=audio or media, video=video or media)
    seeds = seed_dirs(run)
    trained = json.loads((seeds[0] / "model.json").read_text())
    features, missing = extract_one(utt, cfg.extract.encoders, trained)
    if not features:
        raise UserError("no modality could be extracted: " + "; ".join(f"{m} ({r})" for m, r in missing.items()))

    protocol = trained["protocol"]
    modalities = trained["fusion"]["modalities"]
    by_modality = {m: ({"input": features[m]} if m in features else {}) for m in modalities}
    outputs = []
    for d in seeds:  # the run's seeds as one model: their outputs averaged
        model, normalizer = load_model(d)
        shapes = {m: (model.cfg.input_dims[m],) if model.cfg.num_layers_in[m] == 1
                  else (model.cfg.num_layers_in[m], model.cfg.input_dims[m]) for m in modalities}
        feats, masks, present = collate(["input"], by_modality, shapes, normalizer, trained.get("max_frames", 0))
        with torch.no_grad():
            outputs.append(model(feats, masks, present).numpy())
    mean = ensemble_outputs(protocol["task"], outputs)[0]  # what `evaluate` reports as the seeds' ensemble
    if protocol["task"] == "multilabel":  # each head's probability of "yes"
        mean = mean.reshape(-1, 2)[:, 1]
    result = {"run": str(run), "protocol": protocol["name"], "used": sorted(features), "missing": missing,
              "seeds": len(seeds)}
    if protocol["task"] == "classification":
        probs = {c: float(p) for c, p in zip(protocol["classes"], mean)}
        result["prediction"] = max(probs, key=probs.get)
        result["probabilities"] = probs
    elif protocol["task"] == "multilabel":  # every emotion whose head says yes
        probs = {c: float(p) for c, p in zip(protocol["classes"], mean)}
        result["prediction"] = [c for c, p in probs.items() if p > 0.5]
        result["probabilities"] = probs
    else:
        result["prediction"] = float(mean[0])
    return result


def format_prediction(result: dict) -> str:
    shown = result["prediction"]
    if isinstance(shown, list):  # multilabel: the emotions whose heads say yes
        shown = ", ".join(shown) or "none of the emotions"
    lines = [f"prediction: {shown}   ({result['protocol']}, {result['seeds']} seed(s))"]
    for c, p in sorted(result.get("probabilities", {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"  {c:<12} {p:6.1%}  " + "#" * int(round(40 * p)))
    lines.append("modalities used: " + ", ".join(result["used"]))
    for m, reason in result["missing"].items():
        lines.append(f"missing {m}: {reason}")
    return "\n".join(lines)
