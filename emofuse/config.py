"""Typed configs: one YAML file per experiment, `key=value` overrides on the command line.

    emofuse train configs/demo.yaml train.epochs=40 model.preset=paper

The schema is the dataclasses below; OmegaConf checks every key and type against it, and we turn
its errors into one clear line (exit code 2 at the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from emofuse.errors import UserError
from emofuse.fuse.model import Architecture


@dataclass
class CorpusConfig:
    name: str = "demo"  # a module of emofuse.corpora: demo | meld | mosi | mosei | iemocap | emodb | ravdess | manifest
    root: str = "data/demo"  # where the corpus lives on disk (the demo is generated there)
    protocol: str = ""  # which standard protocol of the corpus ("" = its default), e.g. meld: emotion | sentiment
    options: dict[str, Any] = field(default_factory=dict)  # reader options, e.g. {fold: "03"} or manifest columns
    size: str = "full"  # demo only: small | full
    seed: int = 0  # demo only


@dataclass
class ExtractConfig:
    cache: str = "cache"  # stores go to <cache>/<corpus name>/<modality>-<encoder tag>/
    # modality -> encoder spec, e.g. {text: {backend: minilm}}; the spec (with defaults filled in) is
    # fingerprinted. Empty by default: a config names exactly the encoders it uses (YAML dicts merge
    # key by key, so defaults here would sneak extra modalities into a text-only config).
    encoders: dict[str, Any] = field(default_factory=dict)
    # padded size per encoder batch, in the encoder's own unit (samples, tokens, frames)
    batch_budget: dict[str, int] = field(default_factory=lambda: {"audio": 16000 * 60, "text": 8192, "video": 256})
    workers: int = 2  # threads preparing inputs (decode, resample, tokenize, face crops)
    shard_mb: float = 64.0  # shard size; at most this much finished work is redone after a crash
    retry_failures: bool = False  # encode again the utterances listed in failures.jsonl


@dataclass
class ModelConfig(Architecture):
    """The fusion model (emofuse/fuse/model.py says what each knob does) and the modalities it reads."""

    modalities: list[str] = field(default_factory=lambda: ["audio", "text", "video"])


@dataclass
class TrainConfig:
    runs: str = "runs"  # a run goes to <runs>/<name>/seed-<seed>/
    name: str = "demo"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of all steps, then linear decay
    grad_clip: float = 1.0
    patience: int = 8  # early stopping: epochs without a better validation metric
    seed: int = 0
    seeds: int = 1  # run seeds seed, seed+1, ...
    modality_dropout: float = 0.0  # chance to hide each present modality of a training sample
    normalize: bool = True  # standardise each feature dim with train-split mean/std (opensmile LLDs span Hz and dB)
    max_frames: int = 0  # 0 = keep all frames; else evenly subsample longer sequences (train and test alike)
    num_threads: int = 0  # torch threads; 0 = torch's default
    preload_gb: float = 4.0  # load all features into memory when they fit; else read per batch from HDF5
    # Standardise each speaker's features with that speaker's own statistics first (labels unused;
    # a test speaker's unlabelled features included): usual for leave-one-speaker-out speech emotion.
    speaker_norm: bool = False
    tensorboard: bool = False  # also log each epoch to <run>/seed-<s>/tensorboard (needs emofuse[tensorboard])


@dataclass
class Config:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """YAML file + dotted overrides -> a checked Config. Every mistake is one UserError line."""
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise UserError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise UserError(f"override {item!r} is not key=value (e.g. train.epochs=20)")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UserError(f"bad config: {_first_line(e)}") from None


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def _first_line(e: Exception) -> str:
    # OmegaConf messages span several lines (full_key, object_type, ...); the first says what is wrong,
    # and the full_key line says where.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    where = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    head = lines[0] if lines else type(e).__name__
    return f"{head} (at {where})" if where and where not in head else head
