"""openSMILE low-level descriptors (eGeMAPS: pitch, loudness, jitter, formants, ...) at 100 frames/s.

The offline audio default: no model weights, deterministic, one utterance at a time. The work
happens in prepare() (CPU, in the loader workers); encode() only hands the arrays on.

Long inputs are processed in overlapping windows and stitched (chunking.py): in one call openSMILE
held ~2.3 GB for an hour of 16 kHz audio (it buffers the whole signal at every level); in 60 s
windows its memory is that of one window. The descriptors are local, so on speech a 5 s overlap
gives the uncut output: bit for bit for eGeMAPSv02, within 2e-6 relative for ComParE_2016 (its
filters have longer memory); tests/test_encoders.py. Not for any signal: jitter and shimmer follow
pitch periods through a voiced stretch, so a window edge inside one unbroken voiced stretch longer
than half the overlap (2.5 s: a held note, a hum) changes them for the rest of that stretch.
"""

from __future__ import annotations

import warnings

import numpy as np

from emofuse.corpora.base import Utterance
from emofuse.errors import PrepareError, UserError
from emofuse.extract.encoders.base import Encoder, register
from emofuse.extract.encoders.chunking import chunk_spans, stitch
from emofuse.extract.media import load_audio


@register("opensmile")
class OpenSmileEncoder(Encoder):
    modality = "audio"
    fps = 100.0  # every openSMILE LLD set uses a 10 ms hop
    chunk_seconds = 60.0  # longer inputs are processed in windows of this length ...
    overlap_seconds = 5.0  # ... overlapping by this much (see the module docstring)

    def __init__(self, feature_set: str = "eGeMAPSv02", sample_rate: int = 16000):
        import opensmile

        if feature_set not in opensmile.FeatureSet.__members__:
            raise UserError(f"opensmile encoder: unknown feature_set {feature_set!r} (one of: {', '.join(opensmile.FeatureSet.__members__)})")
        if int(sample_rate) <= 0 or int(sample_rate) % 100:
            raise UserError(f"opensmile encoder: sample_rate must be a positive multiple of 100 Hz (its 10 ms hop "
                            f"is then a whole number of samples), got {sample_rate}")
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
        hop = self.sample_rate // 100  # samples per output frame
        window = round(self.chunk_seconds * 100) * hop
        spans = chunk_spans(len(wav), window, round(self.overlap_seconds * 100) * hop, align=hop)
        pieces = [self._lld(wav[s:e]) for s, e in spans]
        # Window [s, e) gives frames [s / hop, s / hop + len(piece)) of the whole input.
        feats = stitch(pieces, [s // hop for s, _ in spans], spans[-1][0] // hop + len(pieces[-1]))
        if len(feats) == 0 or not np.isfinite(feats).all():
            ms = 1000 * len(wav) / self.sample_rate
            raise PrepareError("audio", f"too short for openSMILE {self.feature_set} ({ms:.0f} ms): no valid frame")
        return feats

    def _lld(self, wav: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Segment too short, filling with NaN": handled in prepare()
            return self.smile.process_signal(wav, self.sample_rate).to_numpy(dtype=np.float32)

    def size(self, item: np.ndarray) -> int:
        return len(item)

    def encode(self, items: list[np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(x, dtype=np.float32) for x in items]
