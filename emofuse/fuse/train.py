"""The training loop: cached features -> SSE-FT -> the best model on the validation split.

A plain PyTorch loop: AdamW, linear warm-up then linear decay, gradient clipping, early stopping
on the protocol's validation metric, seeds for everything random. A run folder holds

    config.yaml                   the full resolved config          (runs/<name>/)
    summary.json                  test metrics, mean and std over seeds
    seed-<s>/model.safetensors    best weights;  model.json: FusionConfig, classes, stores' fingerprints
    seed-<s>/normalizer.safetensors  train-split feature statistics, reused by evaluate and predict
    seed-<s>/metrics.jsonl        one line per epoch;  run.json: git commit, package versions, timings
    seed-<s>/curves.png           training loss and validation metric per epoch
    seed-<s>/resume.safetensors   the state after the last finished epoch (weights, optimizer,
                                  scheduler, every RNG); `train --resume RUN` continues from it
                                  and reaches the same numbers as an uninterrupted run. Removed
                                  once the seed is done (result.json written).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import random
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from emofuse import __version__
from emofuse.config import Config, save_config
from emofuse.corpora import corpus_folds, load_corpus
from emofuse.errors import UserError
from emofuse.extract.encoders.base import build_encoder
from emofuse.fuse.data import CachedData, Normalizer, collate, make_batches, prefetched
from emofuse.fuse.metrics import PRIMARY, SELECTABLE, is_better, task_metrics
from emofuse.fuse.model import MODALITIES, SSEFT, FusionConfig


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(cfg: Config, modalities: list[str] | None = None) -> CachedData:
    """The cached features a config's model reads (modalities in canonical order). Splits and labels
    come from the corpus reader with the config's protocol and fold; when the corpus is no longer on
    disk, from the index the extraction wrote."""
    wanted = modalities or cfg.model.modalities
    modalities = [m for m in MODALITIES if m in wanted]
    cache_dir = Path(cfg.extract.cache) / cfg.corpus.name
    utterances = protocol = None
    if Path(cfg.corpus.root).exists():
        corpus = load_corpus(cfg.corpus, progress=False)
        utterances, protocol = corpus.utterances, corpus.protocol
        cache_dir = Path(cfg.extract.cache) / corpus.name  # a manifest corpus may name itself
    data = CachedData(cache_dir, cfg.extract.encoders, modalities, preload_gb=cfg.train.preload_gb,
                      utterances=utterances, protocol=protocol)
    if cfg.train.speaker_norm:
        data.standardize_per_speaker()
    return data


def unfrozen_layers(cfg: Config, modalities: list[str]) -> dict[str, tuple[dict, dict]]:
    """Per modality with model.unfreeze_top: its encoder's top layers, (shape, weights), read from
    the encoder the cache was extracted with (its folder must still be here, as for `predict`)."""
    out = {}
    for m in modalities:
        n = (cfg.model.unfreeze_top or {}).get(m, 0)
        if not n:
            continue
        spec = cfg.extract.encoders[m]
        encoder = build_encoder(m, {**spec, "dtype": "float32", "device": "cpu"})  # the weights, as trained
        if not hasattr(encoder, "top_layers"):
            raise UserError(f"model.unfreeze_top.{m}: the {spec['backend']} encoder has no layers emofuse can train "
                            "(post-LN encoders of the hf and minilm backends have)")
        out[m] = encoder.top_layers(n)
    return out


def fusion_config(cfg: Config, data: CachedData, encoder_layer: dict[str, dict] | None = None) -> FusionConfig:
    p = data.protocol
    # classification: one logit per class; multilabel: one 2-way head (no, yes) per class; regression: one score
    num_outputs = {"classification": len(p.classes), "multilabel": 2 * len(p.classes)}.get(p.task, 1)
    arch = asdict(cfg.model)
    arch.pop("modalities")
    return FusionConfig(modalities=list(data.stores), input_dims=data.dims(), num_layers_in=data.layers(),
                        num_outputs=num_outputs, encoder_layer=encoder_layer or {}, **arch)


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None = None,
            corr_weight: float = 0.0) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y, weight=class_weights)
    if task == "multilabel":  # the paper's IEMOCAP heads: cross-entropy of each 2-way head, averaged
        return F.cross_entropy(out.reshape(-1, 2), y.reshape(-1))
    pred = out.squeeze(-1)
    loss = F.l1_loss(pred, y)  # CMU-MOSI/MOSEI: L1 on the [-3, 3] score
    if corr_weight > 0 and len(y) > 1:
        loss = loss + corr_weight * (1 - pearson(pred, y))
    return loss


def train_step(model: SSEFT, feats: dict, masks: dict, present: torch.Tensor, y: torch.Tensor, task: str,
               class_weights: torch.Tensor | None = None, corr_weight: float = 0.0, step_frames: int = 0) -> float:
    """Forward and backward of one batch, leaving its gradients in the model; returns its loss.

    With step_frames, a batch of more padded frames than that (batch size x its longest sequence)
    runs as micro-batches of at most step_frames. Each micro-batch's summed loss is divided by the
    count of the whole batch (its size, or its total class weight), so the gradients add up to those
    of the whole batch's mean loss: peak memory is that of a micro-batch. (corr_loss, a correlation
    over the whole batch, is refused with step_frames by config.check_values.)"""
    per_step = max(1, step_frames // max(f.shape[1] for f in feats.values())) if step_frames else len(y)
    if per_step >= len(y):
        loss = loss_fn(task, model(feats, masks, present), y, class_weights, corr_weight)
        loss.backward()
        return loss.item()
    # loss_fn's mean written as a sum over the whole batch's count (loss_fn stays the whole-batch
    # path, so runs without micro-batches give the numbers they gave before)
    if task == "classification":
        count = class_weights[y].sum() if class_weights is not None else len(y)
        summed = lambda out, y: F.cross_entropy(out, y, weight=class_weights, reduction="sum")  # noqa: E731
    elif task == "multilabel":
        count = y.numel()
        summed = lambda out, y: F.cross_entropy(out.reshape(-1, 2), y.reshape(-1), reduction="sum")  # noqa: E731
    else:
        count = len(y)
        summed = lambda out, y: F.l1_loss(out.squeeze(-1), y, reduction="sum")  # noqa: E731
    total = 0.0
    for start in range(0, len(y), per_step):
        part = slice(start, start + per_step)
        out = model({m: f[part] for m, f in feats.items()}, {m: k[part] for m, k in masks.items()}, present[part])
        loss = summed(out, y[part]) / count
        loss.backward()
        total += loss.item()
    return total


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of two 1-D tensors, differentiable (0 when either is constant)."""
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm() + eps)


def adamw(model: SSEFT, lr: float, weight_decay: float, unfrozen_lr: float = 5e-5) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one pass over every parameter instead of a dozen
    small ops per tensor; its step took 2 ms instead of 8 for the `fast` model on a CPU. Encoder
    layers trained from their pretrained weights (unfreeze_top) take their own, smaller lr."""
    unfrozen = [p for s in model.streams.values() for p in s.encoder_top.parameters()]
    ids = {id(p) for p in unfrozen}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
    if unfrozen:
        groups.append({"params": unfrozen, "lr": unfrozen_lr})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)


def balanced_class_weights(labels: list[int], n_classes: int) -> torch.Tensor:
    """n / (n_classes * count) per class (scikit-learn's "balanced"): every class weighs the same in
    the loss, which is what unweighted accuracy (mean recall) scores. A class absent from train gets 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


class WeightAverage:
    """An exponential moving average of a model's weights (train.ema): after every optimiser step
    each float tensor moves (1 - decay) of the way to the model's. The average, not the last
    weights, is what is validated, kept and tested; on a few hundred training utterances it smooths
    the step-to-step noise that makes the kept epoch a lottery."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.state[k].lerp_(v, 1 - self.decay)
            else:
                self.state[k].copy_(v)

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module):
        """The model holds the average inside the block and its own weights again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield
        finally:
            model.load_state_dict(own)


def drop_modalities(present: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Hide each present modality with probability `rate`, keeping at least one per sample,
    so one model learns to serve every modality subset."""
    if rate <= 0:
        return present
    keep = torch.rand(present.shape, generator=gen) >= rate
    dropped = present & keep
    empty = ~dropped.any(1) & present.any(1)
    dropped[empty] = present[empty]  # nothing left: keep the sample's modalities as they were
    return dropped


def augment(feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], noise: float, time_mask: float,
            gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Train-time feature augmentation, on the normalised features of a batch:
    noise      add Gaussian noise of this standard deviation to every real frame;
    time_mask  set one span of each sample's real frames to zero (the train mean), its length drawn
               uniformly from 0 to this fraction of the sample's frames (SpecAugment-style).
    Padding stays zero."""
    if noise <= 0 and time_mask <= 0:
        return feats
    out = {}
    for m, x in feats.items():
        mask = masks[m].bool()
        if time_mask > 0:
            n = mask.sum(1)
            span = (torch.rand(n.shape, generator=gen) * time_mask * n).long()
            start = (torch.rand(n.shape, generator=gen) * (n - span + 1)).long()
            t = torch.arange(mask.shape[1])[None, :]
            mask = mask & ~((t >= start[:, None]) & (t < (start + span)[:, None]))
            x = x * mask.reshape(*mask.shape, *[1] * (x.dim() - 2))
        if noise > 0:
            real = masks[m].reshape(*mask.shape, *[1] * (x.dim() - 2))
            x = x + noise * torch.randn(x.shape, generator=gen) * real
        out[m] = x
    return out


@torch.no_grad()
def predict(model: SSEFT, data: CachedData, ids: list[str], normalizer: Normalizer | None,
            max_frames: int, batch_size: int = 64, present_override: dict[str, bool] | None = None,
            noise_std: dict[str, float] | None = None, noise_seed: int = 0) -> np.ndarray:
    """Model outputs for `ids` in their given order. Deterministic: no random crops at test time.
    present_override {m: False} hides a modality; noise_std {m: s} adds Gaussian noise of standard
    deviation s to its (normalised) features, the same noise for the same noise_seed."""
    model.eval()
    lengths = {i: data.length(i) for i in ids}
    gen = torch.Generator().manual_seed(noise_seed)
    out = {}
    for batch in make_batches(ids, lengths, batch_size, shuffle=False):
        feats, masks, present = collate(batch, data.features, data.frame_shapes(), normalizer, max_frames)
        if present_override:
            for j, m in enumerate(data.stores):
                if not present_override.get(m, True):
                    present[:, j] = False
        for m, std in (noise_std or {}).items():
            noise = std * torch.randn(feats[m].shape, generator=gen)
            mask = masks[m].reshape(*masks[m].shape, *[1] * (feats[m].dim() - 2))
            feats[m] = feats[m] + noise * mask  # padding stays zero
        logits = model(feats, masks, present)
        for uid, row in zip(batch, logits.float().numpy()):
            out[uid] = row
    return np.stack([out[i] for i in ids])


def outputs_to_predictions(task: str, outputs: np.ndarray) -> np.ndarray:
    if task == "classification":
        return outputs.argmax(-1)
    if task == "multilabel":  # (N, 2E) -> (N, E) 0/1: does head e say "yes"?
        return outputs.reshape(len(outputs), -1, 2).argmax(-1)
    return outputs[:, 0]


def ensemble_outputs(task: str, outputs: list[np.ndarray]) -> np.ndarray:
    """The seeds' models as one: the mean of their scores (regression) or of their class
    probabilities (classification; each 2-way head of a multilabel model). Seeds differ by more
    than settings often do (CMU-MOSI test r 0.70-0.75 over 5 seeds); their average is steadier."""
    stack = np.stack(outputs).astype(np.float64)  # (seeds, N, outputs)
    if task == "regression":
        return stack.mean(0)
    if task == "multilabel":
        stack = stack.reshape(*stack.shape[:2], -1, 2)
    probs = np.exp(stack - stack.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs.mean(0).reshape(len(outputs[0]), -1)


def evaluate_split(model, data, ids, targets, normalizer, max_frames, **kw) -> dict:
    p = data.protocol
    outputs = predict(model, data, ids, normalizer, max_frames, **kw)
    y_pred = outputs_to_predictions(p.task, outputs)
    y_true = np.array([targets[i] for i in ids])
    return task_metrics(p.task, y_true, y_pred, p.classes)


def fit(cfg: Config, data: CachedData, run_dir: Path, seed: int, progress: bool = True, resume: bool = False) -> dict:
    """Train one seed; save the best model to run_dir; return its validation and test metrics.
    resume: continue from run_dir/resume.safetensors when it is there."""
    t = cfg.train
    set_seed(seed)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    p = data.protocol
    targets = data.targets()
    split = {s: [i for i in data.split_ids(s) if i in targets] for s in (p.train_split, p.dev_split, p.test_split)}
    train_ids, dev_ids, test_ids = split[p.train_split], split[p.dev_split], split[p.test_split]
    for name, ids in ((p.train_split, train_ids), (p.dev_split, dev_ids), (p.test_split, test_ids)):
        if not ids:
            raise UserError(f"split {name!r} of {data.cache_dir} has no labelled utterances")

    unfrozen = unfrozen_layers(cfg, list(data.stores))
    if unfrozen and t.speaker_norm:
        raise UserError("train.speaker_norm standardises every modality, but the encoder layers of "
                        "model.unfreeze_top need the hidden states as the encoder made them; use one or the other")
    model = SSEFT(fusion_config(cfg, data, {m: shape for m, (shape, _) in unfrozen.items()}))
    for m, (_, weights) in unfrozen.items():
        model.streams[m].encoder_top.load_state_dict(weights)
    # Encoder layers read the hidden states as the encoder made them: those modalities are not standardised.
    standardized = {m: f for m, f in data.features.items() if m not in unfrozen}
    normalizer = Normalizer.fit(standardized, train_ids) if t.normalize else None
    opt = adamw(model, lr=t.lr, weight_decay=t.weight_decay, unfrozen_lr=t.unfrozen_lr)
    steps_per_epoch = math.ceil(len(train_ids) / t.batch_size)
    total = max(1, t.epochs * steps_per_epoch)
    warmup = max(1, int(t.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = {i: data.length(i) for i in train_ids}
    primary = t.select_metric or PRIMARY[p.task]
    if primary not in SELECTABLE[p.task]:
        raise UserError(f"train.select_metric: {primary!r} is not a {p.task} metric; choose one of "
                        f"{', '.join(SELECTABLE[p.task])}")
    class_weights = None
    if t.class_weights == "balanced":
        if p.task != "classification":
            raise UserError(f"train.class_weights=balanced is for classification protocols; {p.name} is {p.task}")
        class_weights = balanced_class_weights([targets[i] for i in train_ids], len(p.classes))
    if t.corr_loss > 0 and p.task != "regression":
        raise UserError(f"train.corr_loss is for regression protocols; {p.name} is {p.task}")

    average = WeightAverage(model, t.ema) if t.ema > 0 else None
    best, best_epoch, log, stopped = None, -1, [], False
    if resume and (run_dir / RESUME_FILE).exists():
        best, best_epoch, log, stopped = load_resume(run_dir, model, opt, sched, rng, gen, average)
    # metrics.jsonl holds exactly the finished epochs (a kill may have left one more line)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    start = time.perf_counter()
    first = len(log)
    board = tensorboard_writer(run_dir, purge_step=first) if t.tensorboard else None
    bar = tqdm(range(first, t.epochs if not stopped else first), desc=f"train seed {seed}", unit="epoch",
               initial=first, total=t.epochs, disable=not progress)

    def load(batch):
        y = torch.as_tensor(np.array([targets[i] for i in batch]),
                            dtype=torch.float32 if p.task == "regression" else torch.long)
        return *collate(batch, data.features, data.frame_shapes(), normalizer, t.max_frames), y

    for epoch in bar:
        model.train()
        losses = []
        batches = make_batches(train_ids, lengths, t.batch_size, shuffle=True, rng=rng)
        steps = prefetched(batches, load)  # the next batches are read while this one trains
        for feats, masks, present, y in tqdm(steps, total=len(batches), desc=f"epoch {epoch}", unit="step",
                                             leave=False, disable=not progress):
            present = drop_modalities(present, t.modality_dropout, gen)
            feats = augment(feats, masks, t.feature_noise, t.time_mask, gen)
            opt.zero_grad(set_to_none=True)
            losses.append(train_step(model, feats, masks, present, y, p.task, class_weights, t.corr_loss,
                                     t.step_frames))
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            if average is not None:
                average.update(model)
        # the model that is validated and kept: the weights as trained, or their average
        with average.swapped_into(model) if average is not None else contextlib.nullcontext():
            dev = evaluate_split(model, data, dev_ids, targets, normalizer, t.max_frames)
            if t.keep == "last":
                keep = epoch == t.epochs - 1  # the final weights; nothing is chosen on dev
            else:
                keep = best is None or is_better(primary, dev[primary], best)
            if keep:
                best, best_epoch = dev[primary], epoch
                save_model(model, normalizer, run_dir, data, cfg, seed)
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
                  "dev": {k: v for k, v in dev.items() if isinstance(v, float)}}
        log.append(record)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if board is not None:
            board.add_scalar("train/loss", record["train_loss"], epoch)
            board.add_scalar("train/lr", record["lr"], epoch)
            for k, v in record["dev"].items():
                board.add_scalar(f"dev/{k}", v, epoch)
            board.flush()
        stopped = t.keep == "best" and epoch - best_epoch >= t.patience
        save_resume(run_dir, model, opt, sched, rng, gen, best, best_epoch, log, stopped, average)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", **{f"dev_{primary}": f"{dev[primary]:.3f}"})
        if stopped:
            break
    bar.close()
    if board is not None:
        board.close()
    train_seconds = time.perf_counter() - start
    plot_curves(log, primary, run_dir / "curves.png", f"seed {seed}")

    model, normalizer = load_model(run_dir)
    outputs = predict(model, data, test_ids, normalizer, t.max_frames)
    y_true = np.array([targets[i] for i in test_ids])
    y_pred = outputs_to_predictions(p.task, outputs)
    test = task_metrics(p.task, y_true, y_pred, p.classes)
    (run_dir / "predictions.json").write_text(json.dumps(
        {"task": p.task, "classes": p.classes, "ids": test_ids, "y_true": y_true.tolist(), "y_pred": y_pred.tolist()}))
    result = {"seed": seed, "best_epoch": best_epoch, "epochs_run": len(log), "primary": primary,
              "dev": {primary: best}, "test": test, "train_seconds": train_seconds,
              "n": {"train": len(train_ids), "dev": len(dev_ids), "test": len(test_ids)},
              "parameters": model.count_parameters(), "protocol": p.name, "task": p.task,
              "modalities": list(data.stores)}
    write_provenance(run_dir, data)
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))  # marks the seed done
    (run_dir / RESUME_FILE).unlink(missing_ok=True)
    return result


# ---------------------------------------------------------------------------------------------
# resuming: one safetensors file per seed, written whole after every epoch

RESUME_FILE = "resume.safetensors"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_resume(run_dir: Path, model: SSEFT, opt, sched, rng: np.random.Generator, gen: torch.Generator,
                best, best_epoch: int, log: list[dict], stopped: bool, average: WeightAverage | None = None) -> None:
    """Everything the loop needs to go on exactly where it was: tensors in the file, the rest
    (scheduler, numpy RNG, epoch log) as JSON in its metadata. Written to .tmp, then renamed."""
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"optim.{idx}.{name}"] = value
    if average is not None:
        tensors.update({f"ema.{k}": v.contiguous() for k, v in average.state.items()})
    tensors["rng.torch"] = torch.get_rng_state()  # dropout inside the model
    tensors["rng.modality_dropout"] = gen.get_state()
    meta = {"best": best, "best_epoch": best_epoch, "log": log, "stopped": stopped,
            "param_groups": opt_state["param_groups"], "scheduler": sched.state_dict(),
            "numpy": rng.bit_generator.state}  # batch order
    tmp = run_dir / (RESUME_FILE + ".tmp")
    save_file(tensors, tmp, metadata={"state": json.dumps(meta)})
    tmp.replace(run_dir / RESUME_FILE)


def load_resume(run_dir: Path, model: SSEFT, opt, sched, rng: np.random.Generator, gen: torch.Generator,
                average: WeightAverage | None = None):
    """Restore what save_resume wrote, in place; returns best, best_epoch, log, stopped."""
    path = run_dir / RESUME_FILE
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if average is not None:
        average.state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not average.state:
            raise UserError(f"{path} holds no weight average, but the run's config sets train.ema")
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    rng.bit_generator.state = meta["numpy"]
    gen.set_state(tensors["rng.modality_dropout"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta["best"], meta["best_epoch"], meta["log"], meta["stopped"]


def tensorboard_writer(run_dir: Path, purge_step: int):
    """A SummaryWriter on run_dir/tensorboard; purge_step drops what a killed run logged past its
    last saved epoch, so a resumed run's curves have no duplicate points."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard=true needs the tensorboard package: pip install 'emofuse[tensorboard]'") from None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)


def plot_curves(log: list[dict], primary: str, path: Path, title: str) -> None:
    """Training loss and the validation metric early stopping watches, per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log:
        return
    epochs = [r["epoch"] for r in log]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3))
    ax1.plot(epochs, [r["train_loss"] for r in log], marker=".")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    ax2.plot(epochs, [r["dev"].get(primary, float("nan")) for r in log], marker=".", color="tab:orange")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"validation {primary}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_model(model: SSEFT, normalizer: Normalizer | None, run_dir: Path, data: CachedData, cfg: Config,
               seed: int) -> None:
    # Each file written whole, then renamed: a kill never leaves half a model.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run_dir / "model.safetensors.tmp")
    (run_dir / "model.safetensors.tmp").replace(run_dir / "model.safetensors")
    if normalizer is not None:
        save_file(normalizer.state(), run_dir / "normalizer.safetensors.tmp")
        (run_dir / "normalizer.safetensors.tmp").replace(run_dir / "normalizer.safetensors")
    meta = {"fusion": model.cfg.to_dict(), "protocol": asdict(data.protocol), "seed": seed,
            "max_frames": cfg.train.max_frames, "fingerprints": data.fingerprints(),
            "encoders": {m: data.stores[m].spec for m in data.stores}}
    atomic_write_text(run_dir / "model.json", json.dumps(meta, indent=2))


def load_model(run_dir: Path) -> tuple[SSEFT, Normalizer | None]:
    run_dir = Path(run_dir)
    if not (run_dir / "model.json").exists():
        raise UserError(f"{run_dir}: no model.json (not a trained run, or training did not finish an epoch)")
    meta = json.loads((run_dir / "model.json").read_text())
    model = SSEFT(FusionConfig.from_dict(meta["fusion"]))
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    model.eval()
    norm_path = run_dir / "normalizer.safetensors"
    normalizer = Normalizer.from_state(load_file(norm_path)) if norm_path.exists() else None
    return model, normalizer


def write_provenance(run_dir: Path, data: CachedData) -> None:
    """Enough to trace any number back: code version, packages, the stores it read."""
    import sklearn

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    info = {"emofuse": __version__, "git_commit": commit, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__,
            "stores": {m: {"path": str(s.path), "fingerprint": s.fingerprint} for m, s in data.stores.items()}}
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))


def summarize(results: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every scalar test metric."""
    keys = [k for k, v in results[0]["test"].items() if isinstance(v, float)]
    out = {}
    for k in keys:
        vals = np.array([r["test"][k] for r in results], dtype=float)
        out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    return out


def train(cfg: Config, progress: bool = True, log=print, run_root: Path | None = None,
          data: CachedData | None = None, resume: bool = False) -> dict:
    """Every seed of a config; writes runs/<name>/ and returns the summary.
    resume: keep the seeds that finished, continue the one that was interrupted.
    train.workers > 1: seeds run in that many processes at once (the same numbers as one by one)."""
    run_root = Path(run_root or Path(cfg.train.runs) / cfg.train.name)
    run_root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_root / "config.yaml")
    seeds = [cfg.train.seed + k for k in range(cfg.train.seeds)]
    results = {s: json.loads((run_root / f"seed-{s}" / "result.json").read_text()) for s in seeds
               if resume and (run_root / f"seed-{s}" / "result.json").exists()}
    todo = [s for s in seeds if s not in results]
    if cfg.train.workers > 1 and len(todo) > 1:
        jobs = [(cfg, run_root / f"seed-{s}", s, resume) for s in todo]
        results |= dict(zip(todo, in_processes(_fit_job, jobs, cfg.train.workers, progress, "seeds")))
    else:
        data = data or load_data(cfg)
        for s in todo:
            results[s] = fit(cfg, data, run_root / f"seed-{s}", s, progress=progress, resume=resume)
    results = [results[s] for s in seeds]
    for r in results:
        log(f"seed {r['seed']}: kept epoch {r['best_epoch']}, test {r['primary']} {r['test'][r['primary']]:.4f}")
    about = results[0]
    if "task" not in about:  # a seed finished by an emofuse that did not record task and modalities
        data = data or load_data(cfg)
        about = {"protocol": data.protocol.name, "task": data.protocol.task, "modalities": list(data.stores)}
    summary = {"protocol": about["protocol"], "task": about["task"], "modalities": about["modalities"],
               "seeds": seeds, "test": summarize(results)}
    (run_root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def in_processes(fn, jobs: list[tuple], workers: int, progress: bool, what: str) -> list:
    """fn(*job) for every job in `workers` fresh processes; results in job order. Each process gets
    an equal share of the cores unless train.num_threads says otherwise (spawned, not forked: a
    forked copy of a process that has used OpenMP threads can hang)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    results = [None] * len(jobs)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool, \
            tqdm(total=len(jobs), desc=f"{what} ({workers} processes)", unit=what.rstrip("s"),
                 disable=not progress) as bar:
        futures = {pool.submit(fn, *job): k for k, job in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()  # a worker's error (e.g. UserError) is raised here
                bar.update(1)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return results


def _fit_job(cfg: Config, run_dir: Path, seed: int, resume: bool) -> dict:
    return fit(cfg, load_data(cfg), run_dir, seed, progress=False, resume=resume)


def _train_fold_job(cfg: Config, run_root: Path, resume: bool) -> dict:
    cfg.train.workers = 1  # the processes are the folds'
    return train(cfg, progress=False, log=lambda *_: None, run_root=run_root, resume=resume)


FOLDS_FILE = "folds.json"


def resume_run(run: Path, progress: bool = True, log=print) -> dict:
    """Continue an interrupted `emofuse train` from its run folder, with the config it saved."""
    from emofuse.config import load_config

    run = Path(run)
    if not (run / "config.yaml").exists():
        raise UserError(f"{run}: not a run folder (no config.yaml); nothing to resume")
    cfg = load_config(run / "config.yaml")
    # The run folder is where it is now, whatever train.runs said when it started.
    cfg.train.runs, cfg.train.name = str(run.parent), run.name
    if (run / FOLDS_FILE).exists():
        return train_folds(cfg, progress=progress, log=log, resume=True)
    return train(cfg, progress=progress, log=log, resume=True)


def train_folds(cfg: Config, progress: bool = True, log=print, resume: bool = False) -> dict:
    """Every fold of a cross-validated protocol (e.g. leave one speaker or session out), each with
    every seed. Results are pooled the standard way: per seed, the test predictions of all folds
    are concatenated and scored once; mean and std are then taken over seeds."""
    folds = corpus_folds(cfg.corpus)
    run_root = Path(cfg.train.runs) / cfg.train.name
    run_root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_root / "config.yaml")
    (run_root / FOLDS_FILE).write_text(json.dumps([str(f) for f in folds]))  # tells --resume it is a folds run
    fold_cfgs = []
    for fold in folds:
        fold_cfgs.append(copy.deepcopy(cfg))
        fold_cfgs[-1].corpus.options = {**cfg.corpus.options, "fold": fold}
    if cfg.train.workers > 1:
        jobs = [(c, run_root / f"fold-{f}", resume) for c, f in zip(fold_cfgs, folds)]
        in_processes(_train_fold_job, jobs, cfg.train.workers, progress, "folds")
    else:
        for k, (fold, fold_cfg) in enumerate(zip(folds, fold_cfgs)):
            log(f"fold {fold} ({k + 1}/{len(folds)})")
            train(fold_cfg, progress=progress, log=log, run_root=run_root / f"fold-{fold}", resume=resume)
    pooled = []
    for k in range(cfg.train.seeds):
        preds = [json.loads((run_root / f"fold-{f}" / f"seed-{cfg.train.seed + k}" / "predictions.json").read_text())
                 for f in folds]
        y_true = np.concatenate([p["y_true"] for p in preds])
        y_pred = np.concatenate([p["y_pred"] for p in preds])
        pooled.append({"test": task_metrics(preds[0]["task"], y_true, y_pred, preds[0]["classes"])})
    summary = {"protocol": f"{cfg.corpus.name}-{cfg.corpus.protocol or 'default'}-{len(folds)}-folds-pooled",
               "task": preds[0]["task"], "modalities": cfg.model.modalities, "folds": [str(f) for f in folds],
               "seeds": [cfg.train.seed + k for k in range(cfg.train.seeds)], "test": summarize(pooled)}
    (run_root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
