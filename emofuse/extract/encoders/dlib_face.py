"""Face geometry and identity-style appearance per sampled frame, with dlib (the offline video default).

Per frame with a face: the 68 landmarks, centred and scaled by the inter-ocular distance (136
numbers), then dlib's 128-d ResNet face descriptor of the aligned 150x150 crop: 264 per frame.
prepare() decodes, detects, tracks, finds landmarks and aligns (all CPU); encode() runs the
descriptor network. Frames without a face are dropped, so rows are at most `fps` per second.
"""

from __future__ import annotations

import numpy as np

from emofuse.corpora.base import Utterance
from emofuse.errors import PrepareError, UserError
from emofuse.extract import faces
from emofuse.extract.encoders.base import Encoder, file_sha256, register
from emofuse.extract.media import load_video_frames

CHIP_SIZE, CHIP_PADDING = 150, 0.25  # what dlib's face descriptor was trained on


@register("dlib")
class DlibFaceEncoder(Encoder):
    modality = "video"
    dim = 136 + 128

    def __init__(self, fps: float = 5.0, max_frames: int = 64, detector: str = "dlib", upsample: int = 1, max_gap: int = 2,
                 descriptor_every: int = 1):
        # fps, max_frames: frame sampling (see media.load_video_frames); detector: "dlib" (HOG) or
        # "haar"; upsample=1 finds faces down to ~40 px (face_recognition's default; 0 needs ~80 px
        # and is ~2.5x faster); max_gap: frames a lost face keeps its last box; descriptor_every=k runs
        # the descriptor network (~100 ms per face on a CPU without BLAS) on every k-th face frame
        # only, the frames between repeating the last one: identity-like appearance changes slowly.
        if fps <= 0 or max_frames < 1:
            raise UserError(f"dlib encoder: need fps > 0 and max_frames >= 1, got fps={fps} max_frames={max_frames}")
        if descriptor_every < 1:
            raise UserError(f"dlib encoder: descriptor_every must be >= 1, got {descriptor_every}")
        if detector not in faces.DETECTORS:
            raise UserError(f"dlib encoder: detector must be one of {faces.DETECTORS}, got {detector!r}")
        self.fps = float(fps)
        self.max_frames = int(max_frames)
        self.detector, self.upsample, self.max_gap = detector, int(upsample), int(max_gap)
        self.descriptor_every = int(descriptor_every)
        self._sha = None
        # Load the models now: a missing file is a config error, not a per-utterance failure.
        faces.shape_predictor()
        faces.face_descriptor_model()

    def full_spec(self) -> dict:
        if self._sha is None:
            self._sha = {
                "landmarks": file_sha256(faces.landmark_model_path()),
                "descriptor": file_sha256(faces.descriptor_model_path()),
            }
        return {
            "backend": self.backend,
            "fps": self.fps,
            "max_frames": self.max_frames,
            "detector": self.detector,
            "upsample": self.upsample,
            "max_gap": self.max_gap,
            "descriptor_every": self.descriptor_every,
            "landmarks": "68 points, centred, / inter-ocular distance",
            "crop": {"size": CHIP_SIZE, "padding": CHIP_PADDING},
            "checkpoint_sha256": self._sha,
        }

    def prepare(self, utt: Utterance) -> dict:
        """{"landmarks": (N, 136) float32, "chips": (N, 150, 150, 3) uint8} for the N frames with a face."""
        if not utt.video:
            raise PrepareError("decode", "utterance has no video file")
        frames = load_video_frames(utt.video, self.fps, utt.start, utt.end, self.max_frames)
        frames = faces.speaker_half(frames, utt.labels.get("face_side"))
        keep, boxes = faces.face_frames(frames, self.detector, self.upsample, self.max_gap)
        points, chips = [], []
        for i, box in zip(keep, boxes):
            shape = faces.landmarks(frames[i], box)
            points.append(faces.normalise_landmarks(faces.landmark_array(shape)))
            chips.append(faces.aligned_crop(frames[i], shape, CHIP_SIZE, CHIP_PADDING))
        return {"landmarks": np.stack(points), "chips": np.stack(chips)}

    def size(self, item: dict) -> int:
        return len(item["landmarks"])

    def encode(self, items: list[dict]) -> list[np.ndarray]:
        # The descriptor network sees one chip at a time: results never depend on the batch.
        net = faces.face_descriptor_model()
        out = []
        for item in items:
            n, k = len(item["chips"]), self.descriptor_every
            desc = np.array(net.compute_face_descriptor(list(item["chips"][::k])), dtype=np.float32).reshape(-1, 128)
            desc = np.repeat(desc, k, axis=0)[:n]  # frame i takes the descriptor of frame i - i % k
            out.append(np.concatenate([item["landmarks"], desc], axis=1))
        return out
