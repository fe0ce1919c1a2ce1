"""Typed configs: one YAML file per experiment, `key=value` overrides on the command line.

    emofuse train configs/demo.yaml train.epochs=40 model.preset=paper

The schema is the dataclasses below; OmegaConf checks every key and type against it, check_values()
the ranges types cannot express, and every mistake becomes one clear line (exit code 2 at the CLI).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from emofuse.errors import UserError
from emofuse.fuse.model import MODALITIES, PRESETS, Architecture


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
    unfrozen_lr: float = 5e-5  # lr of encoder layers trained from pretrained weights (model.unfreeze_top)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of all steps, then linear decay
    grad_clip: float = 1.0
    patience: int = 8  # early stopping: epochs without a better validation metric
    # which weights are tested: "best" = the epoch with the best validation metric (stopping early
    # after `patience` epochs without one); "last" = those at the end of all epochs, as the learning
    # rate reaches zero (validation is still logged; nothing is chosen on it)
    keep: str = "best"
    seed: int = 0
    seeds: int = 1  # run seeds seed, seed+1, ...
    modality_dropout: float = 0.0  # chance to hide each present modality of a training sample
    # train-time augmentation of the normalised features (emofuse/fuse/train.py: augment): Gaussian
    # noise of this standard deviation on every real frame; one span of up to this fraction of each
    # sample's frames set to zero (SpecAugment-style time masking). 0 = off. (A modality read by
    # model.unfreeze_top's encoder layers is not normalised: the noise is then in its own units.)
    feature_noise: float = 0.0
    time_mask: float = 0.0
    normalize: bool = True  # standardise each feature dim with train-split mean/std (opensmile LLDs span Hz and dB)
    max_frames: int = 0  # 0 = keep all frames; else evenly subsample longer sequences (train and test alike)
    # > 0: a training batch holding more padded frames than this (batch size x its longest cached
    # sequence) runs forward and backward as micro-batches of at most this many, whose gradients add
    # up to the whole batch's; it bounds training memory (the `paper` preset on 30 s clips on a CPU:
    # 6.5 GiB, 2.1 GiB with 1500). Same batch, same loss; only dropout draws differ.
    step_frames: int = 0
    num_threads: int = 0  # torch threads; 0 = torch's default (with workers > 1: the cores shared out)
    workers: int = 1  # processes training seeds (folds, for a cross-validated protocol) at the same time
    preload_gb: float = 4.0  # load all features into memory when they fit; else read per batch from HDF5
    # Standardise each speaker's features with that speaker's own statistics first (labels unused;
    # a test speaker's unlabelled features included): usual for leave-one-speaker-out speech emotion.
    speaker_norm: bool = False
    # "balanced": weigh each class's cross-entropy by n / (classes x its count) in train, so that every
    # class counts alike (what unweighted accuracy scores); "none": every utterance counts alike.
    class_weights: str = "none"
    # regression: add this weight x (1 - Pearson r of the batch's predictions and targets) to the L1
    # loss, so that training also rewards tracking the targets' ordering (what r scores); 0 = L1 only
    corr_loss: float = 0.0
    # > 0: validate, keep and test an exponential moving average of the weights, updated after every
    # step with this decay (0.99 averages roughly the last 100 steps); 0 = the weights as trained
    ema: float = 0.0
    # the validation metric that picks the best epoch ("" = the task's: weighted_f1, mae, mean_f1),
    # e.g. ua where unweighted accuracy is the number reported
    select_metric: str = ""
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
    layers = [schema]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        layers.append(_file_layer(path))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. train.epochs=20)")
        try:  # one at a time, so that an error names its override
            layers.append(OmegaConf.from_dotlist([item]))
        except yaml.YAMLError as e:
            raise UserError(f"override {item!r}: YAML syntax error{_yaml_where(e)}") from None
        except OmegaConfBaseException as e:
            raise UserError(f"override {item!r}: {_first_line(e)}") from None
        except Exception as e:  # OmegaConf's key parser fails on some malformed keys with IndexError & co
            raise UserError(f"override {item!r}: not a key=value OmegaConf can read ({type(e).__name__}: "
                            f"{_first_line(e)}); keys look like train.epochs") from None
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    # OmegaConf raises plain TypeError/ValueError for some mismatches (a list where a section is due)
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        raise UserError(f"bad config: {_first_line(e)}") from None
    check_values(cfg)
    return cfg


def _file_layer(path: Path) -> DictConfig:
    """A config file as an OmegaConf layer (its YAML loader reads 1e-3 as a number, as users mean);
    a syntax error or a top level that is not a mapping of sections is one line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        # Parsed once here to check it (OmegaConf.load fails on a scalar top level with an assertion),
        # then by OmegaConf itself, whose YAML rules differ a little (1e-3 is a number there).
        data = yaml.safe_load(text)
        if data is not None and not isinstance(data, dict):
            raise UserError(f"config file {path}: expected a mapping of sections (corpus, extract, model, train), "
                            f"got {type(data).__name__} {str(data)[:40]!r}")
        return OmegaConf.load(path) if data is not None else OmegaConf.create({})
    except yaml.YAMLError as e:
        raise UserError(f"config file {path}: YAML syntax error{_yaml_where(e)}") from None
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        raise UserError(f"config file {path}: {_first_line(e)}") from None


def _yaml_where(e: yaml.YAMLError) -> str:
    """ " at line 3, column 7: <what>" from a PyYAML error, on one line."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
    return f"{where}: {what}"


def check_values(cfg: Config) -> None:
    """What the types cannot say: ranges and choices. The first problem is one UserError naming
    the key, the value and what is allowed."""

    def need(ok: bool, key: str, value, allowed: str) -> None:
        if not ok:
            raise UserError(f"bad config: {key} must be {allowed}, got {value!r}")

    def number(key: str, value, low: float, low_inclusive: bool = True, high: float | None = None,
               high_inclusive: bool = False) -> None:
        above = value >= low if low_inclusive else value > low
        below = high is None or (value <= high if high_inclusive else value < high)
        bounds = (f"{'>=' if low_inclusive else '>'} {low}" if high is None else
                  f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}")
        need(math.isfinite(value) and above and below, key, value, f"a finite number {bounds}")

    c, x, m, t = cfg.corpus, cfg.extract, cfg.model, cfg.train
    need(bool(c.name.strip()), "corpus.name", c.name, "a corpus name (demo, meld, iemocap, manifest, ...)")
    need(c.size in ("small", "full"), "corpus.size", c.size, "small or full")
    number("corpus.seed", c.seed, 0)

    need(bool(x.cache.strip()), "extract.cache", x.cache, "a folder")
    for modality, spec in x.encoders.items():
        need(modality in MODALITIES, "extract.encoders", modality, f"keyed by modality ({', '.join(MODALITIES)})")
        need(isinstance(spec, dict) and isinstance(spec.get("backend"), str), f"extract.encoders.{modality}", spec,
             "a mapping with a backend, e.g. {backend: minilm}")
    for modality, budget in x.batch_budget.items():
        number(f"extract.batch_budget.{modality}", budget, 1)
    number("extract.workers", x.workers, 1)
    number("extract.shard_mb", x.shard_mb, 0, low_inclusive=False)

    need(len(m.modalities) > 0 and all(k in MODALITIES for k in m.modalities)
         and len(set(m.modalities)) == len(m.modalities),
         "model.modalities", m.modalities, f"a non-empty list of distinct modalities from {list(MODALITIES)}")
    need(m.preset in PRESETS, "model.preset", m.preset, " or ".join(PRESETS))
    for key in ("width", "heads", "ffn"):
        number(f"model.{key}", getattr(m, key), 1)
    number("model.cross_layers", m.cross_layers, 0)
    number("model.max_positions", m.max_positions, 2)
    for key in ("dropout", "attn_dropout"):
        number(f"model.{key}", getattr(m, key), 0, high=1)
    for key, low in (("self_layers", 0), ("pool_stride", 1)):
        for modality, n in getattr(m, key).items():
            need(modality in MODALITIES, f"model.{key}", modality, f"keyed by modality ({', '.join(MODALITIES)})")
            number(f"model.{key}.{modality}", n, low)

    need(bool(t.runs.strip()), "train.runs", t.runs, "a folder")
    need(bool(t.name.strip()) and "/" not in t.name, "train.name", t.name, "a run name without '/'")
    for key in ("epochs", "batch_size", "patience", "seeds", "workers"):
        number(f"train.{key}", getattr(t, key), 1)
    number("train.lr", t.lr, 0, low_inclusive=False)
    number("train.weight_decay", t.weight_decay, 0)
    number("train.warmup_ratio", t.warmup_ratio, 0, high=1, high_inclusive=True)
    number("train.grad_clip", t.grad_clip, 0, low_inclusive=False)
    # numpy seeds are 32-bit: seed .. seed + seeds - 1 must all be
    number("train.seed", t.seed, 0, high=2**32 - t.seeds, high_inclusive=True)
    number("train.modality_dropout", t.modality_dropout, 0, high=1)
    number("train.feature_noise", t.feature_noise, 0)
    number("train.time_mask", t.time_mask, 0, high=1, high_inclusive=True)
    need(t.keep in ("best", "last"), "train.keep", t.keep, "best or last")
    need(t.class_weights in ("none", "balanced"), "train.class_weights", t.class_weights, "none or balanced")
    number("train.corr_loss", t.corr_loss, 0)
    number("train.ema", t.ema, 0, high=1)
    if t.step_frames and t.corr_loss:
        raise UserError("train.corr_loss scores the correlation over a whole batch, which micro-batches "
                        "(train.step_frames) do not see at once; use one or the other")
    for key in ("max_frames", "step_frames", "num_threads", "preload_gb"):
        number(f"train.{key}", getattr(t, key), 0)


def to_dict(cfg: Config) -> dict:
    # dataclasses, not OmegaConf: a value holding a literal "${" (written "\\${" in a config) would
    # otherwise be taken for an interpolation once more.
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    """The run's config.yaml: load_config reads it back to the same Config."""

    def escaped(value):  # a literal "${" must stay literal when the file is read again
        if isinstance(value, str):
            return value.replace("${", "\\${")
        if isinstance(value, dict):
            return {k: escaped(v) for k, v in value.items()}
        if isinstance(value, list):
            return [escaped(v) for v in value]
        return value

    path.write_text(yaml.safe_dump(escaped(to_dict(cfg)), sort_keys=False, allow_unicode=True), encoding="utf-8")


def _first_line(e: Exception) -> str:
    # OmegaConf messages span several lines (full_key, object_type, ...); the first says what is wrong,
    # and the full_key line says where.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    where = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    head = lines[0] if lines else type(e).__name__
    return f"{head} (at {where})" if where and where not in head else head
