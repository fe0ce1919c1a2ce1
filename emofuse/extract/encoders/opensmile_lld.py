"""openSMILE low-level descriptors (eGeMAPS: pitch, loudness, jitter, formants, ...) at 100 frames/s.

The offline audio default: no model weights, deterministic, one utterance at a time. The work
happens in prepare() (CPU, in the loader workers); encode() only hands the arrays on.
"""

from __future__ import annotations

import warnings

import numpy as np

from emofuse.corpora.base import Utterance
from emofuse.errors import PrepareError, UserError
from emofuse.extract.encoders.base import Encoder, register
from emofuse.extract.media import load_audio


@register("opensmile")
class OpenSmileEncoder(Encoder):
    modality = "audio"
    fps = 100.0  # every openSMILE LLD set uses a 10 ms hop

    def __init__(self, feature_set: str = "eGeMAPSv02", sample_rate: int = 16000):
        import opensmile

        if feature_set not in opensmile.FeatureSet.__members__:
            raise UserError(f"opensmile encoder: unknown feature_set {feature_set!r} (one of: {', '.join(opensmile.FeatureSet.__members__)})")
        self.feature_set, self.sample_rate = feature_set, int(sample_rate)
        self.version = opensmile.__version__
        self.smile = opensmile.Smile(
            feature_set=opensmile.FeatureSet[feature_set],
            feature_level=opensmile.FeatureLevel.LowLevelDescriptors,
        )
        self.dim = len(self.smile.feature_names)  # eGeMAPSv02: 25, ComParE_2016: 65

    def full_spec(self) -> dict:
        return {
            "backend": self.backend,
            "feature_set": self.feature_set,
            "feature_level": "lld",
            "sample_rate": self.sample_rate,
            "opensmile_version": self.version,
        }

    def prepare(self, utt: Utterance) -> np.ndarray:
        """The (T, D) descriptors themselves: openSMILE is CPU work with no batching to gain, and
        doing it here lets a too-short clip fail as a PrepareError like any other bad input."""
        path = utt.audio or utt.video
        if not path:
            raise PrepareError("decode", "utterance has no audio or video file")
        wav = load_audio(path, self.sample_rate, utt.start, utt.end)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Segment too short, filling with NaN": handled below
            feats = self.smile.process_signal(wav, self.sample_rate).to_numpy(dtype=np.float32)
        if len(feats) == 0 or not np.isfinite(feats).all():
            ms = 1000 * len(wav) / self.sample_rate
            raise PrepareError("audio", f"too short for openSMILE {self.feature_set} ({ms:.0f} ms): no valid frame")
        return feats

    def size(self, item: np.ndarray) -> int:
        return len(item)

    def encode(self, items: list[np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(x, dtype=np.float32) for x in items]
