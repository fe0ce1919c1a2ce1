"""Evaluation of a trained run, the modality ablation table, reports and plots.

    evaluate_run(run)  -> report.json, report.md, confusion.png in the run folder (a --folds run:
                          every fold's test predictions pooled per seed)
    ablation(run)      -> trains and tests every modality subset (A, T, V, AT, AV, TV, ATV) with the
                          run's config and seeds -> ablation.json, ablation.md, ablation.png
    robustness(run)    -> the run's models tested with each modality dropped, or corrupted with
                          Gaussian noise at several levels -> robustness.json, .md, .png
"""

from __future__ import annotations

import copy
import json
from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from emofuse.config import Config, load_config  # noqa: E402
from emofuse.corpora.base import LETTER  # noqa: E402
from emofuse.errors import UserError  # noqa: E402
from emofuse.fuse.model import MODALITIES  # noqa: E402
from emofuse.fuse.train import (  # noqa: E402
    FOLDS_FILE, ensemble_outputs, load_data, load_model, outputs_to_predictions, predict, summarize, train)
from emofuse.fuse.metrics import task_metrics  # noqa: E402

# Metrics shown in tables, per task, in this order (multilabel adds each emotion's acc and F1).
TABLE_METRICS = {
    "classification": ["wa", "ua", "weighted_f1"],
    "regression": ["mae", "corr", "acc7", "acc2_has0", "acc2_non0", "f1_non0"],
    "multilabel": ["mean_acc", "mean_f1"],
}


def table_metrics(task: str, summary: dict) -> list[str]:
    """The columns of a table for `summary` (metric -> value): the task's headline metrics, then,
    for one binary head per emotion, each emotion's accuracy and F1 (the paper's IEMOCAP table)."""
    columns = [k for k in TABLE_METRICS[task] if k in summary]
    if task == "multilabel":
        columns += [k for k in summary if k.startswith(("acc_", "f1_"))]
    return columns


# Published numbers to print beside ours, by protocol name: the paper this toolkit reproduces.
# Siriwardhana et al. 2020 (SSE-FT, all three modalities), CMU-MOSI test split. Its Acc-2 and F1
# are the non-zero convention: the SSE-FT code's criterion scores them with exclude_zero=True,
# as MulT's evaluation code does.
PAPER = {
    "mosi-sentiment-regression": {
        "source": "SSE-FT paper, ATV (Siriwardhana et al. 2020)",
        "metrics": {"acc7": 0.465, "acc2_non0": 0.839, "f1_non0": 0.835, "mae": 0.776, "corr": 0.768},
    },
}


def load_run_config(run: Path) -> Config:
    path = Path(run) / "config.yaml"
    if not path.exists():
        raise UserError(f"{run}: not a run folder (no config.yaml); train one with `emofuse train CONFIG`")
    return load_config(path)


def seed_dirs(run: Path) -> list[Path]:
    dirs = sorted(Path(run).glob("seed-*/model.json"))
    if not dirs:
        raise UserError(f"{run}: no trained seed (seed-*/model.json)")
    return [d.parent for d in dirs]


def check_fingerprints(seed_dir: Path, data) -> None:
    """A model is only ever applied to features made with the encoder settings it was trained on;
    a mismatch names both fingerprints and each setting that differs (model.json keeps the specs)."""
    from emofuse.cache.store import spec_differences

    info = json.loads((seed_dir / "model.json").read_text())
    for m, fp in info["fingerprints"].items():
        have = data.fingerprints().get(m)
        if have != fp:
            trained_spec, store = info.get("encoders", {}).get(m), data.stores.get(m)
            diff = ("; ".join(spec_differences(trained_spec, store.spec, ("model", "cache")))
                    if trained_spec is not None and store is not None else "")
            raise UserError(f"{seed_dir}: trained on {m} features with fingerprint {fp[:12]}, the cache has "
                            f"{str(have)[:12]}{f' ({diff})' if diff else ''}; re-extract with the run's encoder "
                            f"settings, or train the run again on this cache (the only way when the setting is new "
                            f"in this version of emofuse, such as the text padding)")


def load_test_split(run: Path):
    """A run's config, its cached data, and the labelled test utterances with their targets."""
    cfg = load_run_config(run)
    data = load_data(cfg)
    targets = data.targets()
    test_ids = [i for i in data.split_ids(data.protocol.test_split) if i in targets]
    return cfg, data, test_ids, np.array([targets[i] for i in test_ids])


def seed_test_outputs(run: Path):
    """One single-split run: its data, test targets, each seed's model outputs on the test split,
    and each seed's learned layer mix (stores with every layer)."""
    cfg, data, test_ids, y_true = load_test_split(run)
    outputs, layer_weights = {}, {}
    for d in seed_dirs(run):
        check_fingerprints(d, data)
        model, normalizer = load_model(d)
        outputs[d.name] = predict(model, data, test_ids, normalizer, cfg.train.max_frames)
        for m, w in model.layer_weights().items():
            layer_weights.setdefault(m, []).append(w)
    return data, y_true, outputs, layer_weights


def evaluate_run(run: Path, log=print) -> dict:
    """Test every seed of a run; a cross-validated run (`train --folds`) is scored as training
    scored it: per seed, the test predictions of all folds pooled."""
    run = Path(run)
    folds = json.loads((run / FOLDS_FILE).read_text()) if (run / FOLDS_FILE).exists() else None
    parts = [seed_test_outputs(run / f"fold-{f}") for f in folds] if folds else [seed_test_outputs(run)]
    datas, targets, outputs_by_part, weights_by_part = zip(*parts)
    data, p = datas[0], datas[0].protocol
    seeds = list(outputs_by_part[0])
    if any(list(outputs) != seeds for outputs in outputs_by_part):
        raise UserError(f"{run}: the folds hold different seeds; finish it with `emofuse train --resume {run}`")
    y_true = np.concatenate(targets)
    seed_outputs = [np.concatenate([outputs[s] for outputs in outputs_by_part]) for s in seeds]
    results, confusion = [], None
    for s, outputs in zip(seeds, seed_outputs):
        metrics = task_metrics(p.task, y_true, outputs_to_predictions(p.task, outputs), p.classes)
        results.append({"seed": s, "test": metrics})
        if p.task == "classification":
            cm = np.array(metrics["confusion"])
            confusion = cm if confusion is None else confusion + cm
    layer_weights = {}
    for weights in weights_by_part:
        for m, w in weights.items():
            layer_weights.setdefault(m, []).extend(w)
    name = p.name
    if folds:  # a fold's protocol names its test fold; the run's summary names them all
        summary = run / "summary.json"
        name = json.loads(summary.read_text())["protocol"] if summary.exists() else f"{p.name}, {len(folds)} folds pooled"
    report = {"protocol": name, "task": p.task, "modalities": list(data.stores), "n_test": len(y_true),
              "seeds": seeds, "test": summarize(results), "per_seed": results,
              "layer_weights": {m: np.mean(w, axis=0).tolist() for m, w in layer_weights.items()}}
    if len(seed_outputs) > 1:
        averaged = outputs_to_predictions(p.task, ensemble_outputs(p.task, seed_outputs))
        report["ensemble"] = {k: v for k, v in task_metrics(p.task, y_true, averaged, p.classes).items()
                              if isinstance(v, float)}
    (run / "report.json").write_text(json.dumps(report, indent=2))
    (run / "report.md").write_text(report_markdown(report, p.classes))
    if confusion is not None:
        plot_confusion(confusion, p.classes, run / "confusion.png", f"{name}: test, {len(results)} seed(s)")
    if report["layer_weights"]:
        plot_layer_weights(report["layer_weights"], run / "layer_weights.png", f"{name}: learned layer weights")
    log(report_markdown(report, p.classes))
    return report


def report_markdown(report: dict, classes: list[str]) -> str:
    letters = "".join(LETTER[m] for m in report["modalities"])
    lines = [f"# {report['protocol']} - test split ({report['n_test']} utterances, modalities {letters}, "
             f"{len(report['seeds'])} seed(s))", "", "| metric | mean | std |", "|---|---|---|"]
    for k, v in report["test"].items():
        lines.append(f"| {k} | {fmt(k, v['mean'])} | {fmt(k, v['std'])} |")
    if "ensemble" in report:
        lines += ["", f"The {len(report['seeds'])} seeds as one model (their outputs averaged): "
                  + ", ".join(f"{k} {fmt(k, v)}" for k, v in report["ensemble"].items() if k in report["test"])]
    for m, weights in report.get("layer_weights", {}).items():
        lines += ["", f"Learned {m} layer weights (softmax, mean over seeds; layer 0 = the encoder's input embeddings):",
                  "", "| layer | " + " | ".join(str(i) for i in range(len(weights))) + " |",
                  "|---" * (len(weights) + 1) + "|", "| weight | " + " | ".join(f"{w:.3f}" for w in weights) + " |"]
    first = report["per_seed"][0]["test"]
    if "per_class_f1" in first:
        lines += ["", f"Per-class F1 ({report['per_seed'][0]['seed']}):", "", "| class | F1 |", "|---|---|"]
        lines += [f"| {c} | {100 * first['per_class_f1'][c]:.1f} |" for c in classes if c in first["per_class_f1"]]
    return "\n".join(lines) + "\n"


def fmt(metric: str, value: float) -> str:
    """Percent for rates, raw numbers for errors and correlations (as papers print them)."""
    if metric in ("mae", "corr") or metric.startswith("n"):
        return f"{value:.3f}"
    return f"{100 * value:.1f}"


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.1 * len(classes) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}\n{100 * norm[i, j]:.0f}%", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_weights(weights: dict[str, list[float]], path: Path, title: str) -> None:
    """One bar chart per modality: how much each encoder layer contributes to the learned mix."""
    fig, axes = plt.subplots(1, len(weights), figsize=(4 * len(weights), 3), squeeze=False)
    for ax, (m, w) in zip(axes[0], weights.items()):
        ax.bar(range(len(w)), w, color="#3182bd")
        ax.axhline(1 / len(w), color="gray", linestyle="--", linewidth=1)  # a uniform mix
        ax.set_xlabel(f"{m} encoder layer")
        ax.set_ylabel("weight")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def modality_subsets(modalities: list[str]) -> list[list[str]]:
    """A, T, V, AT, AV, TV, ATV (for the modalities the config has)."""
    ms = [m for m in MODALITIES if m in modalities]
    return [list(c) for k in range(1, len(ms) + 1) for c in combinations(ms, k)]


def ablation(run: Path, progress: bool = True, log=print) -> dict:
    """Train and test every modality subset with the run's config and seeds."""
    run = Path(run)
    cfg = load_run_config(run)
    rows = {}
    for subset in modality_subsets(cfg.model.modalities):
        letters = "".join(LETTER[m] for m in subset)
        sub_cfg = copy.deepcopy(cfg)
        sub_cfg.model.modalities = subset
        log(f"ablation {letters}: training {cfg.train.seeds} seed(s)")
        summary = train(sub_cfg, progress=progress, log=lambda *_: None, run_root=run / "ablation" / letters)
        rows[letters] = summary["test"]
    table = {"protocol": summary["protocol"], "task": summary["task"], "seeds": cfg.train.seeds, "rows": rows,
             "paper": PAPER.get(summary["protocol"])}
    (run / "ablation.json").write_text(json.dumps(table, indent=2))
    md = ablation_markdown(table)
    (run / "ablation.md").write_text(md)
    plot_ablation(table, run / "ablation.png")
    log(md)
    return table


def plot_ablation(table: dict, path: Path) -> None:
    """One bar per modality subset: the protocol's first table metric, mean with std over seeds."""
    metric = TABLE_METRICS[table["task"]][0]
    rows = table["rows"]
    names = list(rows)
    scale = 1 if metric in ("mae", "corr") else 100
    means = [scale * rows[n][metric]["mean"] for n in names]
    stds = [scale * rows[n][metric]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(names), 3.5))
    ax.bar(names, means, yerr=stds, capsize=4, color=["#9ecae1" if len(n) == 1 else "#3182bd" for n in names])
    for x, m in enumerate(means):
        ax.text(x, m, f"{m:.1f}" if scale == 100 else f"{m:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(metric + (" (%)" if scale == 100 else ""))
    ax.set_title(f"{table['protocol']}: modality ablation, {table['seeds']} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_line(summary: dict) -> str:
    """One line for a training summary: the protocol's table metrics, mean +- std over seeds."""
    test = summary["test"]
    cells = [f"{k} {fmt(k, test[k]['mean'])} +- {fmt(k, test[k]['std'])}" for k in table_metrics(summary["task"], test)]
    return f"{summary['protocol']} test ({len(summary['seeds'])} seed(s)): " + ", ".join(cells)


def ablation_markdown(table: dict) -> str:
    metrics = table_metrics(table["task"], next(iter(table["rows"].values())))
    head = f"Modality ablation, test split, mean +- std over {table['seeds']} seed(s)"
    lines = [head, "", "| modalities | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for letters, summary in table["rows"].items():
        cells = [f"{fmt(k, summary[k]['mean'])} +- {fmt(k, summary[k]['std'])}" for k in metrics if k in summary]
        lines.append(f"| {letters} | " + " | ".join(cells) + " |")
    paper = PAPER.get(table["protocol"])
    if paper:
        cells = [fmt(k, paper["metrics"][k]) if k in paper["metrics"] else "-" for k in metrics]
        lines.append(f"| {paper['source']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# robustness: the trained models, tested with one modality missing or noisy

# Noise standard deviations in units of each feature dimension's train-split std (features are
# standardised with those statistics before the model sees them; see train.normalize).
NOISE_LEVELS = (0.25, 0.5, 1.0, 2.0)


def robustness(run: Path, levels: tuple[float, ...] = NOISE_LEVELS, log=print) -> dict:
    """The table metric on the test split as each modality is dropped (its features hidden, as if
    never extracted) or corrupted with Gaussian noise, mean and std over the run's seeds. The
    noise is drawn from a fixed seed per model seed, so the table is reproducible."""
    run = Path(run)
    cfg, data, test_ids, y_true = load_test_split(run)
    p = data.protocol
    metric = TABLE_METRICS[p.task][0]
    modalities = list(data.stores)
    conditions = {"clean": ({}, {})}
    for m in modalities:
        conditions[f"{m}/dropped"] = ({m: False}, {})
        for s in levels:
            conditions[f"{m}/noise {s:g}"] = ({}, {m: s})
    scores = {c: [] for c in conditions}
    for k, d in enumerate(seed_dirs(run)):
        check_fingerprints(d, data)
        model, normalizer = load_model(d)
        for c, (present, noise) in conditions.items():
            outputs = predict(model, data, test_ids, normalizer, cfg.train.max_frames,
                              present_override=present, noise_std=noise, noise_seed=k)
            scores[c].append(task_metrics(p.task, y_true, outputs_to_predictions(p.task, outputs), p.classes)[metric])

    def stat(values):
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}

    table = {"protocol": p.name, "task": p.task, "metric": metric, "seeds": len(scores["clean"]),
             "levels": list(levels), "clean": stat(scores["clean"]),
             "rows": {m: {"dropped": stat(scores[f"{m}/dropped"]),
                          "noise": {f"{s:g}": stat(scores[f"{m}/noise {s:g}"]) for s in levels}}
                      for m in modalities}}
    (run / "robustness.json").write_text(json.dumps(table, indent=2))
    md = robustness_markdown(table)
    (run / "robustness.md").write_text(md)
    plot_robustness(table, run / "robustness.png")
    log(md)
    return table


def robustness_markdown(table: dict) -> str:
    metric, levels = table["metric"], table["levels"]

    def cell(v):
        return f"{fmt(metric, v['mean'])} +- {fmt(metric, v['std'])}"

    lines = [f"Robustness, test split, {metric}, mean +- std over {table['seeds']} seed(s); "
             f"noise in units of each feature's train-split std", "",
             "| modality | clean | dropped | " + " | ".join(f"noise {s:g}" for s in levels) + " |",
             "|---" * (3 + len(levels)) + "|"]
    for m, row in table["rows"].items():
        cells = [cell(table["clean"]), cell(row["dropped"])] + [cell(row["noise"][f"{s:g}"]) for s in levels]
        lines.append(f"| {LETTER[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_robustness(table: dict, path: Path) -> None:
    """Metric against noise level, one line per corrupted modality; dashed: that modality dropped."""
    metric = table["metric"]
    scale = 1 if metric in ("mae", "corr") else 100
    xs = [0.0] + list(table["levels"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, (m, row) in enumerate(table["rows"].items()):
        color = f"C{k}"
        ys = [table["clean"]["mean"]] + [row["noise"][f"{s:g}"]["mean"] for s in table["levels"]]
        ax.plot(xs, [scale * y for y in ys], marker="o", color=color, label=f"{LETTER[m]} + noise")
        ax.axhline(scale * row["dropped"]["mean"], color=color, linestyle="--", linewidth=1,
                   label=f"{LETTER[m]} dropped")
    ax.set_xlabel("noise std (units of feature std)")
    ax.set_ylabel(metric + (" (%)" if scale == 100 else ""))
    ax.set_title(f"{table['protocol']}: robustness, {table['seeds']} seed(s)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
