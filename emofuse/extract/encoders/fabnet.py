"""FabNet (Wiles, Koepke, Zisserman, BMVC 2018): a face embedding learnt by watching faces move.

Our own re-implementation of the encoder of the official release (FAb-Net's models_multiview.py,
`FrontaliseModelMasks_wider(inner_nc=256, num_additional_ids=32)`, the model SSE-FT used): eight
4x4 convolutions with stride 2 and padding 1 halve a 256x256 RGB face (values in [0, 1]) down to one
256-d vector. The indices are those of the release's `encoder` nn.Sequential, so its keys load as
they are:

    0       Conv2d(3, 32)      1       LeakyReLU(0.2)
    2 3 4   Conv2d(32, 64)     BatchNorm2d  LeakyReLU(0.2)
    5 6 7   Conv2d(64, 128)    BatchNorm2d  LeakyReLU(0.2)
    8 9 10  Conv2d(128, 256)   BatchNorm2d  LeakyReLU(0.2)
    11..19  3 x [Conv2d(256, 256) BatchNorm2d LeakyReLU(0.2)]
    20      Conv2d(256, 256)   -> (256, 1, 1)

A release file (`affectnet_4views.pth`, ...) is a dict whose `state_dict_model` holds `encoder.*`,
`decoder.*` and `mask.*` (the decoders that trained it; unused here), sometimes behind a
DataParallel `module.` prefix. Every encoder key must be there with its shape (BatchNorm's
`num_batches_tracked` may be absent: old PyTorch did not save it, and eval mode never reads it);
anything else is an error, never a silent random init.

Frames are sampled at `fps`; each keeps the speaker's face, cropped by one of:
  box      the tracked face box, made square and widened by `margin` on each side (FabNet was
           trained on VoxCeleb face tracks, which are loose detector crops);
  aligned  dlib's landmark-aligned face chip (rotated upright), with `padding` around the face;
  none     the whole frame (SSE-FT's input: clips that are already face crops).
Frames without a face are dropped, as in the dlib encoder. BatchNorm runs in eval mode, so each
frame's vector depends on that frame alone: batching never changes the numbers.

This module also holds `load_torch_checkpoint`, the safe checkpoint reader shared with the fairseq
backend: `torch.load(weights_only=True)` with a short allow-list of data-only globals; a file that
needs anything else is refused unless the user says it is trusted.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from emofuse.corpora.base import Utterance
from emofuse.errors import PrepareError, UserError
from emofuse.extract import faces
from emofuse.extract.encoders.base import Encoder, file_sha256, register
from emofuse.extract.encoders.hf import pick_device, precision
from emofuse.extract.media import load_video_frames

INPUT_SIZE = 256  # eight stride-2 convolutions take 256 x 256 down to 1 x 1
WIDTHS = [3, 32, 64, 128, 256, 256, 256, 256, 256]
CROPS = ("box", "aligned", "none")
RELEASE_PAGE = "https://www.robots.ox.ac.uk/~vgg/research/unsup_learn_watch_faces/fabnet.html"
# Parts of the release file that are not the encoder: the training decoders (and DataParallel's prefix).
IGNORED_PREFIXES = ("decoder.", "mask.")


# ---------------------------------------------------------------------------------------------
# safe checkpoint loading (shared with the fairseq backend)


def load_torch_checkpoint(path, what: str, trust: bool = False, safe_globals=()):
    """torch.load a pickled checkpoint without running code from it.

    Loads with weights_only=True, allowing `safe_globals` besides torch's own (tensors, dicts,
    OrderedDict...). A file that needs any other global (a class or function of some library, or
    a crafted payload) is refused with a UserError, unless trust=True: then it is fully unpickled.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        needs = f" (it refers to {found.group(1)})" if found else ""
        raise UserError(
            f"{what}: {path} cannot be loaded as plain data{needs}; fully unpickling it could run code "
            f"stored in the file. If you trust where it comes from, set trust_checkpoint: true in the "
            f"encoder's spec (e.g. the override extract.encoders.<modality>.trust_checkpoint=true)"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{what}: cannot read checkpoint {path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# the network


class FabNet(nn.Module):
    """The FabNet encoder; `encoder` has the release's layer indices (see the module docstring)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        for k, (c_in, c_out) in enumerate(zip(WIDTHS, WIDTHS[1:])):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1))
            last = k == len(WIDTHS) - 2
            if 0 < k and not last:  # no BatchNorm after the first conv; nothing after the last
                layers.append(nn.BatchNorm2d(c_out))
            if not last:
                layers.append(nn.LeakyReLU(0.2))
        self.encoder = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) in [0, 1] -> (B, 256)."""
        return self.encoder(x).flatten(1)


def _name(key) -> str:
    """A state-dict key without DataParallel's `module.` prefix."""
    key = str(key)
    return key[len("module."):] if key.startswith("module.") else key


def encoder_state_dict(checkpoint, path) -> dict:
    """The `encoder.*` tensors of a release file (or of a bare state dict), checked key by key."""
    if isinstance(checkpoint, dict) and "state_dict_model" in checkpoint:
        state = checkpoint["state_dict_model"]
    elif isinstance(checkpoint, dict) and any(_name(k).startswith("encoder.") for k in checkpoint):
        state = checkpoint
    else:
        keys = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"fabnet encoder: {path} is not a FabNet checkpoint (no 'state_dict_model'; found {keys})")

    ours = FabNet().state_dict()
    loaded, unexpected = {}, []
    for key, value in state.items():
        name = _name(key)
        if name.startswith(IGNORED_PREFIXES):
            continue
        if name not in ours:
            unexpected.append(key)
        elif not isinstance(value, torch.Tensor) or value.shape != ours[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(f"fabnet encoder: {path}: {key} has shape {shape}, expected {tuple(ours[name].shape)}")
        else:
            loaded[name] = value
    missing = [k for k in ours if k not in loaded and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        raise UserError(
            f"fabnet encoder: {path} does not match the FabNet encoder: "
            f"missing {missing[:6] or 'none'}, unexpected {unexpected[:6] or 'none'}"
        )
    for k in ours:  # counters that eval mode never reads; old PyTorch did not save them
        loaded.setdefault(k, torch.zeros((), dtype=torch.long))
    return loaded


# ---------------------------------------------------------------------------------------------
# face crops


def resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if img.shape[:2] == (size, size):
        return img
    shrink = img.shape[0] > size or img.shape[1] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def box_crop(frame: np.ndarray, box, margin: float, size: int) -> np.ndarray:
    """The square of side max(w, h) * (1 + 2 margin) centred on the box, black outside the frame."""
    import cv2

    left, top, right, bottom = box
    side = max(1, int(round(max(right - left, bottom - top) * (1 + 2 * margin))))
    x0 = int(round((left + right - side) / 2))
    y0 = int(round((top + bottom - side) / 2))
    h, w = frame.shape[:2]
    pad = max(0, -x0, -y0, x0 + side - w, y0 + side - h)
    if pad:
        frame = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        x0, y0 = x0 + pad, y0 + pad
    return resize(np.ascontiguousarray(frame[y0 : y0 + side, x0 : x0 + side]), size)


# ---------------------------------------------------------------------------------------------
# the encoder


AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register("fabnet")
class FabNetEncoder(Encoder):
    modality = "video"
    dim = 256

    def __init__(
        self,
        checkpoint: str | None = None,
        fps: float = 5.0,
        max_frames: int = 300,  # the paper fed 300 frames (10 s at 30 fps); longer clips are sampled sparser
        crop: str = "box",
        margin: float = 0.2,  # box crop: widening on each side, as a fraction of the face box
        padding: float = 0.25,  # aligned crop: dlib's padding around the face
        detector: str = "dlib",
        upsample: int = 1,
        max_gap: int = 2,
        dtype: str = "float32",
        device: str = "auto",
        batch_frames: int = 64,  # frames per forward: bounds memory, never changes the numbers
        trust_checkpoint: bool = False,
    ):
        if not checkpoint:
            raise UserError(f"fabnet encoder: option 'checkpoint' is required (a FabNet release file, see {RELEASE_PAGE})")
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise UserError(
                f"fabnet encoder: checkpoint {str(path)!r} not found. Nothing is downloaded at run time: "
                f"download release_bmvc_fabnet.zip from {RELEASE_PAGE}, unzip it, and point 'checkpoint' "
                f"at one of its files, e.g. {path.parent / 'release' / 'affectnet_4views.pth'}"
            )
        if fps <= 0 or max_frames < 1 or batch_frames < 1:
            raise UserError(f"fabnet encoder: need fps > 0, max_frames >= 1, batch_frames >= 1 "
                            f"(got {fps}, {max_frames}, {batch_frames})")
        if crop not in CROPS:
            raise UserError(f"fabnet encoder: crop must be one of {CROPS}, got {crop!r}")
        if detector not in faces.DETECTORS:
            raise UserError(f"fabnet encoder: detector must be one of {faces.DETECTORS}, got {detector!r}")
        if dtype not in AUTOCAST:
            raise UserError(f"fabnet encoder: dtype must be one of {sorted(AUTOCAST)}, got {dtype!r}")
        self.device = pick_device(device)
        if dtype == "float16" and not self.device.startswith("cuda"):
            raise UserError("fabnet encoder: dtype float16 needs a GPU (use bfloat16 on a CPU)")

        self.checkpoint = str(checkpoint)
        self.fps, self.max_frames = float(fps), int(max_frames)
        self.crop, self.margin, self.padding = crop, float(margin), float(padding)
        self.detector, self.upsample, self.max_gap = detector, int(upsample), int(max_gap)
        self.dtype, self.batch_frames = dtype, int(batch_frames)
        self._sha = None

        # FAb-Net's training scripts save their argparse options ('opts') beside the weights.
        checkpoint_data = load_torch_checkpoint(path, "fabnet encoder", trust_checkpoint, [argparse.Namespace])
        state = encoder_state_dict(checkpoint_data, path)
        self.model = FabNet()
        self.model.load_state_dict(state, strict=True)
        self.model.eval().requires_grad_(False).to(self.device)
        if crop == "aligned":
            faces.shape_predictor()  # a missing landmark model is a config error, not a per-utterance one

    def full_spec(self) -> dict:
        if self._sha is None:
            self._sha = file_sha256(self.checkpoint)
        crop = {"mode": self.crop, "size": INPUT_SIZE}
        if self.crop == "box":
            crop["margin"] = self.margin
        elif self.crop == "aligned":
            crop["padding"] = self.padding
        spec = {
            "backend": self.backend,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self._sha,
            "fps": self.fps,
            "max_frames": self.max_frames,
            "crop": crop,
            "input": "RGB in [0, 1]",
            "dtype": self.dtype,
        }
        if self.crop != "none":
            spec.update(detector=self.detector, upsample=self.upsample, max_gap=self.max_gap)
        return spec

    def prepare(self, utt: Utterance) -> np.ndarray:
        """(N, 256, 256, 3) uint8 face crops of the N sampled frames that show the face."""
        if not utt.video:
            raise PrepareError("decode", "utterance has no video file")
        frames = load_video_frames(utt.video, self.fps, utt.start, utt.end, self.max_frames)
        frames = faces.speaker_half(frames, utt.labels.get("face_side"))
        if self.crop == "none":
            return np.stack([resize(f, INPUT_SIZE) for f in frames])
        keep, boxes = faces.face_frames(frames, self.detector, self.upsample, self.max_gap)
        if self.crop == "box":
            crops = [box_crop(frames[i], box, self.margin, INPUT_SIZE) for i, box in zip(keep, boxes)]
        else:
            crops = [faces.aligned_crop(frames[i], faces.landmarks(frames[i], box), INPUT_SIZE, self.padding)
                     for i, box in zip(keep, boxes)]
        return np.stack(crops)

    def size(self, item: np.ndarray) -> int:
        return len(item)

    def encode(self, items: list[np.ndarray]) -> list[np.ndarray]:
        frames = np.concatenate(items)
        out = np.concatenate([self.forward(frames[i : i + self.batch_frames])
                              for i in range(0, len(frames), self.batch_frames)])
        ends = np.cumsum([len(it) for it in items])
        return [np.ascontiguousarray(x) for x in np.split(out, ends[:-1])]

    def forward(self, crops: np.ndarray) -> np.ndarray:
        """(B, 256, 256, 3) uint8 -> (B, 256) float32."""
        x = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div(255.0)
        with torch.inference_mode(), precision(AUTOCAST[self.dtype], self.device):
            return self.model(x).float().cpu().numpy()
