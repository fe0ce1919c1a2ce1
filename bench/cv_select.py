"""Compare training settings by grouped cross-validation on train + dev; the test split is never read.

A dev split of a few hundred utterances ranks settings noisily: CMU-MOSI's has 229 utterances
from 10 videos, and settings that differed by 0.01-0.02 in dev Pearson r came out the other way
round on test (docs/RESULTS.md). This script pools the train and dev utterances, cuts them into
K folds by group (the utterance's dialogue, i.e. its video for CMU-MOSI, else its speaker), and
for each fold k trains on the other folds but one, keeps the epoch on fold k+1 (the config's own
rule: train.keep, train.select_metric) and predicts fold k. Per seed, the held-out predictions of
all K folds are scored together: one number over every train + dev utterance, ~6x the dev split.

    python bench/cv_select.py configs/mosi.yaml --name base
    python bench/cv_select.py configs/mosi.yaml --name layers1 --against base model.self_layers.text=1

Prints the pooled metric per seed and, with --against NAME, the paired difference from that
setting (same seeds, same folds) with its standard error over the seed x fold pairs. Writes
bench/results/cv_<corpus>_<name>.json; the runs stay under runs/cv/<corpus>/<name>/ and a
finished (fold, seed) is not trained again.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HIGHER_IS_BETTER = {"mae": False}  # every other metric: higher is better


def fold_of_group(groups: list[str], k: int) -> dict[str, int]:
    """Groups -> fold index: sorted largest first, each to the fold with the fewest utterances so
    far (scikit-learn's GroupKFold balancing; ties by name, so the folds never change)."""
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    load, fold = [0] * k, {}
    for g in sorted(sizes, key=lambda g: (-sizes[g], g)):
        f = int(np.argmin(load))
        fold[g] = f
        load[f] += sizes[g]
    return fold


def cv_splits(utterances, protocol, k: int, fold: int):
    """Copies of the utterances with train + dev re-split for `fold`: fold -> test, fold + 1 -> dev,
    the rest -> train. The real test split becomes "unused"."""
    pooled = [u for u in utterances if u.split in (protocol.train_split, protocol.dev_split)]
    group = {u.id: u.dialogue or u.speaker or u.id for u in pooled}
    fold_of = fold_of_group([group[u.id] for u in pooled], k)
    out = []
    for u in utterances:
        u = copy.copy(u)
        if u.id in group:
            f = fold_of[group[u.id]]
            u.split = (protocol.test_split if f == fold else protocol.dev_split if f == (fold + 1) % k
                       else protocol.train_split)
        else:
            u.split = "unused"
        out.append(u)
    return out


def fit_fold(config: str, overrides: list[str], k: int, fold: int, seed: int, run_dir: Path) -> tuple[dict, bool]:
    """One (fold, seed): train with the config's rules on the re-split data. Returns the held-out
    predictions and whether it was trained now (False: done by an earlier call)."""
    from emofuse.config import load_config
    from emofuse.fuse.train import fit, load_data

    trained = not (run_dir / "result.json").exists()
    if trained:
        cfg = load_config(config, overrides)
        data = load_data(cfg)
        data.utterances = cv_splits(data.utterances, data.protocol, k, fold)
        fit(cfg, data, run_dir, seed, progress=False)
    return json.loads((run_dir / "predictions.json").read_text()), trained


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value settings to compare, as for `emofuse train`")
    p.add_argument("--name", required=True, help="this setting's name (runs/cv/<corpus>/<name>, the JSON)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="(fold, seed) trainings at once, one process each")
    p.add_argument("--against", default=None, help="the name of an earlier result to compare with, pair by pair")
    p.add_argument("--runs", default=str(common.ROOT / "runs" / "cv"))
    args = p.parse_intermixed_args(argv)  # settings may come before or after the options

    from emofuse.config import load_config
    from emofuse.fuse.metrics import PRIMARY, task_metrics
    from emofuse.fuse.train import in_processes

    cfg = load_config(args.config, args.overrides)
    corpus = cfg.corpus.name
    root = Path(args.runs) / corpus / args.name
    # finished trainings are reused, so a name must keep its settings, those the config file gives included
    settings = {"config": args.config, "overrides": args.overrides, "folds": args.folds,
                "resolved": dataclasses.asdict(cfg)}
    marker = root / "settings.json"
    if marker.exists() and json.loads(marker.read_text()) != settings:
        raise SystemExit(f"{root} holds runs of other settings ({marker.read_text().strip()}); "
                         f"choose another --name or delete that folder")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings))
    units = [(fold, cfg.train.seed + s) for s in range(args.seeds) for fold in range(args.folds)]
    jobs = [(args.config, args.overrides, args.folds, fold, seed, root / f"fold-{fold}" / f"seed-{seed}")
            for fold, seed in units]
    start = time.perf_counter()
    preds, trained = zip(*in_processes(fit_fold, jobs, args.workers, True, "folds"))
    minutes = (time.perf_counter() - start) / 60

    task, classes = preds[0]["task"], preds[0]["classes"]
    metric = cfg.train.select_metric or PRIMARY[task]
    per_unit = {f"{fold}/{seed}": task_metrics(task, np.array(pr["y_true"]), np.array(pr["y_pred"]), classes)[metric]
                for (fold, seed), pr in zip(units, preds)}
    pooled = {}
    for seed in sorted({s for _, s in units}):
        mine = [pr for (_, s), pr in zip(units, preds) if s == seed]
        y_true = np.concatenate([pr["y_true"] for pr in mine])
        y_pred = np.concatenate([pr["y_pred"] for pr in mine])
        pooled[str(seed)] = {k: float(v) for k, v in task_metrics(task, y_true, y_pred, classes).items()
                             if isinstance(v, float)}
    result = {"config": args.config, "overrides": args.overrides, "name": args.name, "metric": metric,
              "folds": args.folds, "n_utterances": int(sum(len(pr["ids"]) for pr in preds) // args.seeds),
              "per_fold_seed": per_unit, "pooled_per_seed": pooled,
              "pooled_mean": float(np.mean([v[metric] for v in pooled.values()])),
              "minutes": minutes, "trained_now": int(sum(trained))}

    rows = [[f"seed {s}", f"{v[metric]:.4f}"] for s, v in pooled.items()] + [["mean", f"{result['pooled_mean']:.4f}"]]
    title = f"{' '.join([args.name, *args.overrides])}: {args.folds}-fold CV on train+dev, pooled {metric}"
    if args.against:
        other = json.loads((common.RESULTS / f"cv_{corpus}_{args.against}.json").read_text())
        pairs = [u for u in per_unit if u in other["per_fold_seed"]]
        sign = 1 if HIGHER_IS_BETTER.get(metric, True) else -1
        diff = np.array([sign * (per_unit[u] - other["per_fold_seed"][u]) for u in pairs])
        result["against"] = {"name": args.against, "pairs": len(pairs), "gain": float(diff.mean()),
                             "standard_error": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None,
                             "pooled_mean_other": other["pooled_mean"]}
    path = common.write_result(f"cv_{corpus}_{args.name}", result)
    print(common.table(rows, ["", f"pooled {metric}"], title))
    if args.against:
        a = result["against"]
        print(f"against {a['name']} (pooled {a['pooled_mean_other']:.4f}): gain per fold {a['gain']:+.4f} "
              f"(standard error {a['standard_error']:.4f}, {a['pairs']} fold x seed pairs)")
    print(f"{minutes:.1f} min ({sum(trained)} of {len(units)} trainings run now); wrote {path}")
    return result


if __name__ == "__main__":
    main()
