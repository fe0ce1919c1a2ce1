"""Find the speaker's face in sampled video frames, follow it, and give landmarks and aligned crops.

Detection runs on every sampled frame (dlib's frontal HOG detector, or OpenCV's Haar cascade).
Tracking is simple and predictable: when several faces appear, keep the one closest to the face
of the previous frame (the largest one in the first frame); when a frame has none, reuse the last
box for up to `max_gap` frames (a blink, a turned head); frames with no face after that are dropped.

Models come from the `face_recognition_models` package (68-point shape predictor, ResNet face
descriptor); they are loaded once per thread: the pipeline prepares utterances in several threads,
and sharing one dlib detector or predictor between threads gave run-to-run different landmarks.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from pathlib import Path

import numpy as np

from emofuse.errors import PrepareError, UserError

Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels; right/bottom exclusive
DETECTORS = ("dlib", "haar")


# ---------------------------------------------------------------------------------------------
# models


def model_file(name: str) -> Path:
    """A file of face_recognition_models, found without importing the package (its __init__ needs
    pkg_resources, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("face models: the package face_recognition_models is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise UserError(f"face models: {path} is missing; reinstall face_recognition_models")
    return path


def landmark_model_path() -> Path:
    return model_file("shape_predictor_68_face_landmarks.dat")


def descriptor_model_path() -> Path:
    return model_file("dlib_face_recognition_resnet_model_v1.dat")


_local = threading.local()


def per_thread(load):
    """Like functools.cache, but one object per thread (dlib and OpenCV models are not thread-safe)."""

    @functools.wraps(load)
    def get():
        key = load.__name__
        if not hasattr(_local, key):
            setattr(_local, key, load())
        return getattr(_local, key)

    return get


@per_thread
def _dlib_detector():
    import dlib

    return dlib.get_frontal_face_detector()


@per_thread
def _haar_detector():
    import cv2

    return cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))


@per_thread
def shape_predictor():
    import dlib

    return dlib.shape_predictor(str(landmark_model_path()))


@per_thread
def face_descriptor_model():
    import dlib

    return dlib.face_recognition_model_v1(str(descriptor_model_path()))


# ---------------------------------------------------------------------------------------------
# detection and tracking


def detect_faces(frame: np.ndarray, detector: str = "dlib", upsample: int = 0) -> list[Box]:
    """Every face box in one RGB frame (H, W, 3) uint8. upsample > 0 finds smaller faces, slower."""
    h, w = frame.shape[:2]
    if detector == "dlib":
        # dlib misreads strided arrays (a face is missed about half the time): always pass a contiguous one.
        rects = _dlib_detector()(np.ascontiguousarray(frame), upsample)
        boxes = [(r.left(), r.top(), r.right() + 1, r.bottom() + 1) for r in rects]
    elif detector == "haar":
        import cv2

        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if upsample:
            gray = cv2.resize(gray, None, fx=2**upsample, fy=2**upsample)
        found = _haar_detector().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5)
        f = 2**upsample
        boxes = [(int(x / f), int(y / f), int((x + bw) / f), int((y + bh) / f)) for x, y, bw, bh in found]
    else:
        raise UserError(f"unknown face detector {detector!r} (one of: {', '.join(DETECTORS)})")
    # Clip to the frame: dlib may return boxes that stick out of it.
    boxes = [(max(0, l), max(0, t), min(w, r), min(h, b)) for l, t, r, b in boxes]
    return [b for b in boxes if b[2] > b[0] and b[3] > b[1]]


def _centre(box: Box) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def track_faces(frames: np.ndarray, detector: str = "dlib", upsample: int = 0, max_gap: int = 2) -> list[Box | None]:
    """One box per frame (None where no face), following one face through the frames."""
    boxes: list[Box | None] = []
    last, gap = None, 0
    for frame in frames:
        found = detect_faces(frame, detector, upsample)
        if found:
            if last is None:
                box = max(found, key=_area)
            else:
                box = min(found, key=lambda b: np.linalg.norm(_centre(b) - _centre(last)))
            last, gap = box, 0
        elif last is not None and gap < max_gap:
            box, gap = last, gap + 1
        else:
            box = None
        boxes.append(box)
    return boxes


def face_frames(frames: np.ndarray, detector: str = "dlib", upsample: int = 0, max_gap: int = 2) -> tuple[list[int], list[Box]]:
    """Indices of the frames that have a face, and its box in each. PrepareError("face") if none does."""
    boxes = track_faces(frames, detector, upsample, max_gap)
    keep = [i for i, b in enumerate(boxes) if b is not None]
    if not keep:
        raise PrepareError("face", f"no face found in {len(frames)} frames")
    return keep, [boxes[i] for i in keep]


# ---------------------------------------------------------------------------------------------
# landmarks and crops


def landmarks(frame: np.ndarray, box: Box):
    """dlib's 68-point shape (a full_object_detection) of the face in `box`."""
    import dlib

    return shape_predictor()(np.ascontiguousarray(frame), dlib.rectangle(box[0], box[1], box[2] - 1, box[3] - 1))


def landmark_array(shape) -> np.ndarray:
    """(68, 2) float32 x, y pixel coordinates of a dlib shape."""
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def aligned_crop(frame: np.ndarray, shape, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """The face rotated upright and scaled to (size, size, 3) uint8, as dlib's descriptor expects it."""
    import dlib

    return dlib.get_face_chip(np.ascontiguousarray(frame), shape, size=size, padding=padding)


def normalise_landmarks(points: np.ndarray) -> np.ndarray:
    """(68, 2) -> (136,): centred on the face and scaled by the inter-ocular distance, so that the
    numbers describe the expression, not where the face is in the frame or how big it is."""
    left_eye, right_eye = points[36:42].mean(axis=0), points[42:48].mean(axis=0)
    scale = max(float(np.linalg.norm(right_eye - left_eye)), 1.0)
    return ((points - points.mean(axis=0)) / scale).reshape(-1).astype(np.float32)


def speaker_half(frames: np.ndarray, side: str | None) -> np.ndarray:
    """The half of two-person frames where the speaking actor sits (IEMOCAP records both actors side
    by side; its reader sets labels["face_side"] by a documented, configurable rule). None: whole frame."""
    if side is None:
        return frames
    if side not in ("left", "right"):
        raise PrepareError("face", f"face_side must be 'left' or 'right', got {side!r}")
    half = frames.shape[2] // 2
    # A copy, not a view: dlib reads a strided (non-contiguous) array wrongly about half the time
    # (no face found in a frame that has one), so everything given to dlib must be contiguous.
    return np.ascontiguousarray(frames[:, :, :half] if side == "left" else frames[:, :, half:])
