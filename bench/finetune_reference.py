"""A reference point outside emofuse's design: all-MiniLM-L6-v2 fine-tuned end to end on CMU-MOSI.

emofuse keeps its encoders frozen (extract once, train many times). On CMU-MOSI text, its fusion
model on frozen MiniLM token states reaches test Pearson r 0.721 (docs/RESULTS.md). Is the small
encoder the limit, or its being frozen? This script trains the same MiniLM with every weight free:
mean-pooled last layer -> one linear score, L1 loss, AdamW (encoder lr 3e-5, head 1e-3), linear
warm-up and decay, batch 32, 6 epochs; the epoch with the best dev r is tested, as configs/mosi.yaml
does. Each seed re-runs the encoder at every step, so it takes minutes per seed, not seconds.

    python bench/finetune_reference.py --seeds 3 --cv 5
Prints dev and test r and MAE per seed, and with --cv the pooled held-out r of
bench/cv_select.py's cross-validation (one seed); writes bench/results/finetune_reference.json. Reads
../shared/data/mosi (never copied); skipped with a message when it is absent.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "finetune_reference"
DEFAULT_DATA = common.ROOT.parent / "shared" / "data"


def batches(tokenizer, utterances, batch_size: int, rng=None):
    import torch

    order = np.arange(len(utterances)) if rng is None else rng.permutation(len(utterances))
    for i in range(0, len(order), batch_size):
        batch = [utterances[j] for j in order[i : i + batch_size]]
        inputs = tokenizer([u.text for u in batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
        yield inputs, torch.tensor([u.labels["sentiment"] for u in batch], dtype=torch.float32)


def minilm_regressor():
    """MiniLM + mean pooling over real tokens (how the sentence model was trained) + a linear score."""
    import torch
    from transformers import AutoModel

    from emofuse.extract.encoders.minilm import model_dir

    class Regressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = AutoModel.from_pretrained(model_dir(), local_files_only=True)
            self.head = torch.nn.Linear(self.encoder.config.hidden_size, 1)

        def forward(self, inputs):
            states = self.encoder(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(states.dtype)
            return self.head((states * mask).sum(1) / mask.sum(1)).squeeze(-1)

    return Regressor()


def predict(model, tokenizer, utterances) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in batches(tokenizer, utterances, 128)]).numpy()


def score(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    from emofuse.fuse.metrics import regression_metrics

    return {k: float(v) for k, v in regression_metrics(y_true, y_pred).items() if isinstance(v, float)}


def labels(utterances) -> np.ndarray:
    return np.array([u.labels["sentiment"] for u in utterances])


def train_seed(seed: int, split: dict, tokenizer, epochs: int, lr: float, batch_size: int = 32) -> dict:
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = minilm_regressor()
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr},
                             {"params": model.head.parameters(), "lr": 1e-3}], weight_decay=0.01)
    total = epochs * -(-len(split["train"]) // batch_size)
    warmup = max(1, int(0.1 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    start, best = time.perf_counter(), None
    for epoch in range(epochs):
        model.train()
        for x, y in batches(tokenizer, split["train"], batch_size, rng):
            loss = torch.nn.functional.l1_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        dev = score(labels(split["dev"]), predict(model, tokenizer, split["dev"]))
        if best is None or dev["corr"] > best["dev"]["corr"]:
            test_pred = predict(model, tokenizer, split["test"])
            best = {"seed": seed, "epoch": epoch, "dev": dev, "test": score(labels(split["test"]), test_pred),
                    "test_pred": test_pred.tolist()}
    best["seconds"] = time.perf_counter() - start
    return best


def cross_validate(corpus, tokenizer, folds: int, seed: int, epochs: int, lr: float) -> dict:
    """bench/cv_select.py's protocol: train + dev in `folds` folds by video; each fold trains on
    folds - 2, keeps its epoch on the next fold and predicts its own; the predictions pooled."""
    from cv_select import cv_splits

    y_true, y_pred = [], []
    for fold in range(folds):
        utts = cv_splits(corpus.utterances, corpus.protocol, folds, fold)
        split = {s: [u for u in utts if u.split == s] for s in ("train", "dev", "test")}
        r = train_seed(seed, split, tokenizer, epochs, lr)
        y_true.append(labels(split["test"]))
        y_pred.append(np.array(r["test_pred"]))
        common.log(f"[finetune] CV fold {fold}: epoch {r['epoch']}, held-out r {r['test']['corr']:.3f} ({r['seconds']:.0f} s)")
    return score(np.concatenate(y_true), np.concatenate(y_pred))


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder (read only)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-5, help="the encoder's learning rate")
    p.add_argument("--cv", type=int, default=0,
                   help="also K-fold cross-validation on train + dev with seed 0, as bench/cv_select.py does (0 = off)")
    args = p.parse_args(argv)
    root = Path(args.data) / "mosi"
    if not root.is_dir():
        msg = f"finetune_reference: skipped: {root} is absent"
        print(msg)
        return {"skipped": msg}
    threads = common.setup_threads(args.threads)
    common.quiet_transformers()
    from transformers import AutoTokenizer

    from emofuse.corpora import cmu
    from emofuse.extract.encoders.minilm import model_dir

    corpus = cmu.load(root, name="mosi")
    split = {s: [u for u in corpus.utterances if u.split == s] for s in ("train", "dev", "test")}
    tokenizer = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    seeds = 1 if args.quick else args.seeds
    results = []
    for seed in range(seeds):
        r = train_seed(seed, split, tokenizer, 1 if args.quick else args.epochs, args.lr)
        results.append(r)
        common.log(f"[finetune] seed {seed}: epoch {r['epoch']}, dev r {r['dev']['corr']:.3f}, "
                   f"test r {r['test']['corr']:.3f}, MAE {r['test']['mae']:.3f} ({r['seconds']:.0f} s)")
    for r in results:
        del r["test_pred"]  # the scores are kept, not the 685 predictions
    test_r = [r["test"]["corr"] for r in results]
    out = {"quick": args.quick, "threads": threads, "epochs": args.epochs, "lr": args.lr, "per_seed": results,
           "dev_r_mean": float(np.mean([r["dev"]["corr"] for r in results])),
           "test_r_mean": float(np.mean(test_r)), "test_r_std": float(np.std(test_r, ddof=1)) if len(test_r) > 1 else 0.0,
           "test_mae_mean": float(np.mean([r["test"]["mae"] for r in results]))}
    if args.cv:
        out["cv"] = {"folds": args.cv, "seed": 0, **cross_validate(corpus, tokenizer, args.cv, 0, args.epochs, args.lr)}
    path = common.write_result(NAME, out, args.out)
    rows = [[f"seed {r['seed']}", r["epoch"], f"{r['dev']['corr']:.3f}", f"{r['test']['corr']:.3f}", f"{r['test']['mae']:.3f}"]
            for r in results]
    rows.append(["mean", "", f"{out['dev_r_mean']:.3f}", f"{out['test_r_mean']:.3f} +- {out['test_r_std']:.3f}",
                 f"{out['test_mae_mean']:.3f}"])
    print(common.table(rows, ["", "kept epoch", "dev r", "test r", "test MAE"],
                       "all-MiniLM-L6-v2 fine-tuned end to end on CMU-MOSI (reference, not emofuse)"))
    if args.cv:
        print(f"{args.cv}-fold CV on train + dev (seed 0), pooled held-out r: {out['cv']['corr']:.3f}")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
