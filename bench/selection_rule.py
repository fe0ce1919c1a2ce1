"""Which epoch to test, judged on validation data alone: the best epoch on dev (train.keep=best)
or the last one (train.keep=last)?

Reads the per-epoch validation curves of runs trained to the end (train.keep=last, so that every
curve is whole; <run>/seed-*/metrics.jsonl, or <run>/fold-*/seed-*/ for cross-validated
protocols). For the last-epoch rule the dev metric at the final epoch is an honest estimate: nothing
was chosen on it. For the best-epoch rule a run's own maximum is not (it is the top of a noisy
curve), so each run's chosen epoch is scored with the mean curve of the *other* runs at that epoch:
what a model trained that long scores on an unseen dev set, on average. The paired difference of
the two, with its standard error over runs, says which rule to use; no test number is read.

    python bench/selection_rule.py runs/emodb-loso --metric ua
Prints the table, writes <run>/selection_rule.png (mean dev curve, the two estimates) and
bench/results/selection_rule_<run>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "selection_rule"


def read_curves(run: Path, metric: str) -> np.ndarray:
    files = sorted(run.glob("seed-*/metrics.jsonl")) + sorted(run.glob("fold-*/seed-*/metrics.jsonl"))
    if not files:
        raise SystemExit(f"no metrics.jsonl under {run}/seed-* or {run}/fold-*/seed-*")
    curves = [[json.loads(line)["dev"][metric] for line in open(f)] for f in files]
    if len({len(c) for c in curves}) != 1:
        raise SystemExit(f"curves of unequal length under {run}: train them to the end (train.keep=last)")
    return np.array(curves)


def compare(curves: np.ndarray, higher_is_better: bool = True) -> dict:
    sign = 1 if higher_is_better else -1
    chosen = (sign * curves).argmax(axis=1)
    others_at_chosen = np.array([np.delete(curves, i, axis=0)[:, e].mean() for i, e in enumerate(chosen)])
    last = curves[:, -1]
    diff = last - others_at_chosen
    return {"runs": len(curves), "epochs": curves.shape[1], "chosen_epochs": chosen.tolist(),
            "best_rule_own_dev": float(curves[np.arange(len(curves)), chosen].mean()),
            "best_rule_estimate": float(others_at_chosen.mean()), "last_epoch": float(last.mean()),
            "last_minus_best": float(diff.mean()), "standard_error": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "mean_curve": curves.mean(axis=0).tolist()}


def plot(result: dict, metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(result["mean_curve"], color="black", label=f"mean dev {metric} over {result['runs']} runs")
    ax.axhline(result["last_epoch"], color="tab:blue", ls="--", label=f"last epoch: {result['last_epoch']:.3f}")
    ax.axhline(result["best_rule_estimate"], color="tab:red", ls=":",
               label=f"best epoch, scored by the other runs: {result['best_rule_estimate']:.3f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run folder trained with train.keep=last")
    p.add_argument("--metric", default="ua", help="the dev metric to compare (e.g. ua, corr, weighted_f1)")
    p.add_argument("--lower-is-better", action="store_true", help="for metrics such as mae")
    p.add_argument("--out", default=None, help="JSON result path (default bench/results/selection_rule_<run>.json)")
    args = p.parse_args(argv)
    curves = read_curves(args.run, args.metric)
    result = compare(curves, higher_is_better=not args.lower_is_better)
    result.update(run=str(args.run), metric=args.metric)
    plot(result, args.metric, args.run / "selection_rule.png", f"{args.run.name}: which epoch to test")
    path = common.write_result(f"{NAME}_{args.run.name}", result, args.out)
    print(common.table(
        [["best epoch on dev (keep=best)", f"{result['best_rule_own_dev']:.3f}", f"{result['best_rule_estimate']:.3f}"],
         ["last epoch (keep=last)", f"{result['last_epoch']:.3f}", f"{result['last_epoch']:.3f}"]],
        ["rule", f"dev {args.metric} as chosen", "estimate on unseen dev"],
        f"{result['runs']} runs x {result['epochs']} epochs, {args.run}"))
    print(f"last - best: {result['last_minus_best']:+.4f} (standard error {result['standard_error']:.4f})")
    print(f"wrote {path} and {args.run / 'selection_rule.png'}")
    return result


if __name__ == "__main__":
    main()
