"""Cached features + labels -> padded batches with masks. Reads only through `cache` and `corpora`.

A sample is one utterance: for each modality a (T, D) or (T, L, D) array, or None when the
modality is missing (not extracted, or in failures.jsonl). Missing modalities become
`present = False` for that sample and the model masks them; they never crash a run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from emofuse.cache.store import FeatureStore, spec_differences
from emofuse.corpora.base import Protocol, Utterance, read_utterances
from emofuse.errors import UserError
from emofuse.extract.encoders.base import RUNTIME_OPTIONS, build_encoder, fingerprint


def find_store(cache_dir: Path, modality: str, spec: dict) -> FeatureStore:
    """The store in `cache_dir` made for `modality` with an encoder whose full spec agrees with
    every setting given in `spec` (the config names a few settings; store.json has them all).
    A store made with other settings is never used: the error names it, both fingerprints and
    the settings that differ. Of several stores that agree with what the config names, the one made
    with the config's full spec (same fingerprint) is used; if none or several are, that is an error."""
    spec = {k: v for k, v in spec.items() if k not in RUNTIME_OPTIONS}
    candidates, others = [], []
    for meta_path in sorted(Path(cache_dir).glob(f"{modality}-*/store.json")):
        try:
            meta = json.loads(meta_path.read_text())
            full = meta["encoder"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{meta_path}: unreadable store.json ({e}); remove that store and extract again") from None
        if all(full.get(k) == v for k, v in spec.items()):
            candidates.append(meta_path.parent)
        else:
            others.append((meta_path.parent, meta))
    if not candidates and not others:
        raise UserError(f"no {modality} feature store in {cache_dir}; run `emofuse extract` with this config first")
    if not candidates:
        raise UserError(_no_match_message(cache_dir, modality, spec, others))
    if len(candidates) > 1:
        metas = [json.loads((p / "store.json").read_text()) for p in candidates]
        # The config's full spec (every default) tells them apart, e.g. a store made before a change
        # of the encoder's defaults or of its padding policy beside one made after: only on this
        # path, as it loads the model.
        full, _ = config_full_spec(modality, spec)
        exact = [p for p, m in zip(candidates, metas) if full is not None and m["fingerprint"] == fingerprint(full)]
        if len(exact) == 1:
            return FeatureStore(exact[0])
        names = ", ".join(f"{p.name} (fingerprint {m['fingerprint'][:12]})" for p, m in zip(candidates, metas))
        differ = sorted({k for m in metas[1:] for k in set(m["encoder"]) | set(metas[0]["encoder"])
                         if m["encoder"].get(k) != metas[0]["encoder"].get(k)})
        ours = f"; the config's settings give fingerprint {fingerprint(full)[:12]}" if full is not None else ""
        raise UserError(f"several {modality} stores in {cache_dir} match {spec}: {names}, differing in "
                        f"{', '.join(differ)}{ours}; name more encoder settings in the config, or remove the "
                        f"stale store")
    return FeatureStore(candidates[0])


def _no_match_message(cache_dir: Path, modality: str, spec: dict, others: list[tuple[Path, dict]]) -> str:
    """Which store comes closest to the config's encoder settings, its fingerprint, the config's
    fingerprint (when the encoder can be built here), and each setting that differs."""
    full, why_not = config_full_spec(modality, spec)
    wanted = full if full is not None else spec  # all settings when known, else the ones the config names

    def differing(meta: dict) -> list[str]:
        store_spec = meta["encoder"] if full is not None else {k: meta["encoder"].get(k) for k in spec}
        return spec_differences(wanted, store_spec, ("config", "store"))

    path, meta = min(others, key=lambda pm: len(differing(pm[1])))
    if full is not None:
        ours = f"the config's settings give fingerprint {fingerprint(full)[:12]}"
    else:
        ours = f"the config's fingerprint is not known here ({why_not})"
    return (f"no {modality} feature store in {cache_dir} was made with the config's encoder settings {spec}: "
            f"the closest, {path.name} (fingerprint {meta['fingerprint'][:12]}), differs in "
            f"{'; '.join(differing(meta)) or 'settings the config does not name'}; {ours}. Run `emofuse "
            f"extract` with this config, or set the config's encoder to the store's settings")


def config_full_spec(modality: str, spec: dict) -> tuple[dict | None, str]:
    """The full spec (every default, checkpoint hashes) of the config's encoder, by building it: only
    on this error path, as it loads the model. (None, why) when it cannot be built here."""
    try:
        return build_encoder(modality, spec).full_spec(), ""
    except UserError as e:  # a missing backend, package or checkpoint: the rest of the message still helps
        return None, str(e)
    except Exception as e:  # only a diagnostic: whatever stops the build must not hide the real error
        return None, f"{type(e).__name__}: {e}"


def load_protocol(cache_dir: Path) -> Protocol:
    path = Path(cache_dir) / "protocol.json"
    if not path.exists():
        raise UserError(f"{path} not found; run `emofuse extract` for this corpus first")
    return Protocol(**json.loads(path.read_text()))


@dataclass
class Normalizer:
    """Per-dimension standardisation with train-split statistics (feature scales differ wildly:
    opensmile mixes Hz, dB and ratios). Saved with the run so prediction uses the same numbers."""

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]

    @classmethod
    def fit(cls, features: dict[str, Mapping], ids: list[str]) -> "Normalizer":
        mean, std = {}, {}
        for m, by_id in features.items():
            # Running sums in float64 over the train utterances only.
            n, s, ss = 0, 0.0, 0.0
            for uid in ids:
                x = by_id.get(uid)
                if x is None:
                    continue
                shape = x.shape[1:]
                x = x.astype(np.float64).reshape(len(x), -1)
                n += len(x)
                s = s + x.sum(0)
                ss = ss + (x * x).sum(0)
            if n == 0:
                raise UserError(f"no training utterance has {m} features")
            mu = s / n
            var = np.maximum(ss / n - mu * mu, 0.0)
            mean[m] = mu.reshape(shape).astype(np.float32)
            std[m] = np.sqrt(var + 1e-6).reshape(shape).astype(np.float32)
        return cls(mean, std)

    def __call__(self, m: str, x: np.ndarray) -> np.ndarray:
        return self.in_place(m, torch.from_numpy(x.astype(np.float32))).numpy()

    def in_place(self, m: str, x: torch.Tensor) -> torch.Tensor:
        """Standardise float32 x where it lies (no temporaries: collate writes each utterance
        into the padded batch once and standardises it there)."""
        return x.sub_(torch.from_numpy(self.mean[m])).div_(torch.from_numpy(self.std[m]))

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"{m}.mean": torch.from_numpy(v) for m, v in self.mean.items()}
        out.update({f"{m}.std": torch.from_numpy(v) for m, v in self.std.items()})
        return out

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "Normalizer":
        mean = {k[: -len(".mean")]: v.numpy() for k, v in state.items() if k.endswith(".mean")}
        std = {k[: -len(".std")]: v.numpy() for k, v in state.items() if k.endswith(".std")}
        return cls(mean, std)


class StoreFeatures(Mapping):
    """A store seen as {id: features}, read from HDF5 on access (through the OS page cache).
    Used when the features do not fit the preload budget: memory stays bounded by a batch."""

    def __init__(self, store: FeatureStore):
        self.store = store

    def __getitem__(self, uid: str) -> np.ndarray:
        if uid not in self.store.index:
            raise KeyError(uid)
        return self.store.get(uid)

    def __iter__(self):
        return iter(self.store.index)

    def __len__(self) -> int:
        return len(self.store)


class SpeakerStandardized(Mapping):
    """One modality's {id: features}, each utterance standardised with its speaker's statistics."""

    def __init__(self, by_id: Mapping, modality: str, speaker_of: dict[str, str], stats: dict[str, Normalizer]):
        self.by_id, self.modality, self.speaker_of, self.stats = by_id, modality, speaker_of, stats

    def __getitem__(self, uid: str) -> np.ndarray:
        return self.stats[self.speaker_of[uid]](self.modality, self.by_id[uid])

    def __iter__(self):
        return iter(self.by_id)

    def __len__(self) -> int:
        return len(self.by_id)


class CachedData:
    """Everything a run needs from the cache: features per modality, labels, splits."""

    def __init__(self, cache_dir: Path, encoders: dict[str, dict], modalities: list[str], preload_gb: float = 4.0,
                 utterances: list[Utterance] | None = None, protocol: Protocol | None = None):
        """Splits and labels come from `utterances`/`protocol` (the corpus reader: another protocol or
        fold needs no re-extraction) or, when not given, from the index written at extraction."""
        self.cache_dir = Path(cache_dir)
        if utterances is None:
            utt_path = self.cache_dir / "utterances.jsonl"
            if not utt_path.exists():
                raise UserError(f"{utt_path} not found; run `emofuse extract` for this corpus first")
            utterances = read_utterances(utt_path)
        self.utterances: list[Utterance] = utterances
        self.protocol = protocol or load_protocol(self.cache_dir)
        self.modalities = modalities
        self.stores: dict[str, FeatureStore] = {}
        for m in modalities:
            if m not in encoders:
                raise UserError(f"modality {m!r} is in model.modalities but has no encoder in extract.encoders")
            self.stores[m] = find_store(self.cache_dir, m, encoders[m])
        # Preload (float16, as stored) when everything fits the budget: one sequential read per shard.
        # Otherwise read per batch from HDF5; the page cache keeps hot shards in memory anyway.
        total = sum(s.nbytes() for s in self.stores.values())
        self.preloaded = total <= preload_gb * (1 << 30)
        self.features: dict[str, Mapping] = {
            m: s.load_all() if self.preloaded else StoreFeatures(s) for m, s in self.stores.items()}

    def standardize_per_speaker(self) -> None:
        """Standardise every utterance with its own speaker's feature statistics (mean and std over
        all of that speaker's utterances and frames, labels unused), before the train-split
        Normalizer. Usual in leave-one-speaker-out speech emotion work (Emo-DB, IEMOCAP): it removes
        voice and recording differences between speakers. For a test speaker it reads that
        speaker's unlabelled test features, so it is off unless a config asks (train.speaker_norm)."""
        by_speaker: dict[str, list[str]] = {}
        for u in self.utterances:
            if u.speaker is None:
                raise UserError(f"train.speaker_norm needs a speaker for every utterance; {u.id} has none")
            by_speaker.setdefault(u.speaker, []).append(u.id)
        speaker_of = {u.id: u.speaker for u in self.utterances}
        standardized = {}
        for m, by_id in self.features.items():
            stats = {spk: Normalizer.fit({m: by_id}, ids) for spk, ids in by_speaker.items()
                     if any(by_id.get(i) is not None for i in ids)}  # a speaker may lack a modality
            standardized[m] = SpeakerStandardized(by_id, m, speaker_of, stats)
        self.features = standardized

    def length(self, uid: str) -> int:
        """Frames of an utterance over all modalities, for length bucketing (no feature read)."""
        return sum(s.length(uid) for s in self.stores.values() if uid in s)

    def fingerprints(self) -> dict[str, str]:
        return {m: s.fingerprint for m, s in self.stores.items()}

    def dims(self) -> dict[str, int]:
        return {m: s.dim for m, s in self.stores.items()}

    def layers(self) -> dict[str, int]:
        return {m: s.layers for m, s in self.stores.items()}

    def frame_shapes(self) -> dict[str, tuple]:
        """(D,) or (L, D) per modality, in the model's modality order."""
        return {m: (s.dim,) if s.layers == 1 else (s.layers, s.dim) for m, s in self.stores.items()}

    def split_ids(self, split: str) -> list[str]:
        return [u.id for u in self.utterances if u.split == split]

    def targets(self) -> dict[str, float | int | np.ndarray]:
        """Per labelled utterance: a class index, a score, or (multilabel) a 0/1 vector over classes."""
        p = self.protocol
        out = {}
        for u in self.utterances:
            y = u.labels.get(p.label)
            if y is None:
                continue
            if p.task == "classification":
                out[u.id] = p.classes.index(y)
            elif p.task == "multilabel":
                present = {y} if isinstance(y, str) else set(y)
                out[u.id] = np.array([c in present for c in p.classes], dtype=np.int64)
            else:
                out[u.id] = float(y)
        return out


def make_batches(ids: list[str], lengths: dict[str, int], batch_size: int, shuffle: bool,
                 rng: np.random.Generator | None = None) -> list[list[str]]:
    """Length-bucketed batches. Training: shuffle, sort within pools of 50 batches, shuffle the
    batches. Evaluation: sorted by length, always the same."""
    if not shuffle:
        order = sorted(ids, key=lambda i: lengths[i])
        return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    ids = list(ids)
    rng.shuffle(ids)
    pool = batch_size * 50
    batches = []
    for k in range(0, len(ids), pool):
        chunk = sorted(ids[k : k + pool], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def subsample(x: np.ndarray, max_frames: int) -> np.ndarray:
    """Evenly spaced frames: deterministic, the same at train and test time."""
    if max_frames <= 0 or len(x) <= max_frames:
        return x
    idx = np.linspace(0, len(x) - 1, max_frames).round().astype(int)
    return x[idx]


def prefetched(batches: list, load, ahead: int = 2):
    """load(batch) for every batch, in order, each computed in a background thread up to `ahead`
    batches before it is asked for: reading and collating the next batches overlaps the training
    step (numpy and torch release the GIL while they copy). The results are those of a plain loop."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="emofuse-prefetch") as pool:
        pending = deque(pool.submit(load, b) for b in batches[:ahead])
        for k in range(len(batches)):
            if k + ahead < len(batches):
                pending.append(pool.submit(load, batches[k + ahead]))
            yield pending.popleft().result()


def collate(ids: list[str], features: dict[str, dict[str, np.ndarray]], frame_shapes: dict[str, tuple],
            normalizer: Normalizer | None, max_frames: int = 0) -> tuple[dict, dict, torch.Tensor]:
    """Pad each modality (the keys of frame_shapes, in order) to its longest sequence in the batch.
    Returns features {m: (B, T, ...)}, masks {m: (B, T) True = real frame}, present (B, M)."""
    modalities = list(frame_shapes)
    B = len(ids)
    feats, masks = {}, {}
    present = torch.zeros(B, len(modalities), dtype=torch.bool)
    for j, m in enumerate(modalities):
        arrays = []
        for uid in ids:
            x = features[m].get(uid)
            arrays.append(subsample(x, max_frames) if x is not None and len(x) > 0 else None)
        T = max([len(a) for a in arrays if a is not None], default=1)
        out = torch.zeros((B, T, *frame_shapes[m]), dtype=torch.float32)
        mask = torch.zeros((B, T), dtype=torch.bool)
        for b, a in enumerate(arrays):
            if a is not None:
                # float16 -> float32 on the way in: torch converts ~15x faster than numpy
                out[b, : len(a)].copy_(_tensor(a))
                if normalizer is not None and m in normalizer.mean:  # (not those read by encoder layers)
                    normalizer.in_place(m, out[b, : len(a)])
                mask[b, : len(a)] = True
                present[b, j] = True
        feats[m] = out
        masks[m] = mask
    return feats, masks, present


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over a's memory, read only here (a read-only array would make torch warn)."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())

