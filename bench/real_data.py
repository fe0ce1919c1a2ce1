"""Real-data results (docs/RESULTS.md): emofuse next to the linear probe, from one command.

For each row, through the real CLI in a subprocess and timed: `emofuse extract CONFIG` (a second
run does no encoder work) then `emofuse train CONFIG --seeds N [--folds]`; the summary's mean and
standard deviation over the seeds go into the table, and `emofuse evaluate RUN`'s numbers for the
seeds as one model (outputs averaged, as `emofuse predict` uses a run; not timed). The probe row comes from bench/probe.py on
the same files (run here unless --no-probe; then its last bench/results/probe.json is read).
Reads ../shared/data (never copied); skipped with a message when it is absent.

    python bench/real_data.py                 # every row, 5 seeds (~30 min on 2 CPU cores)
    python bench/real_data.py --only mosi --seeds 2
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "real_data"
DEFAULT_DATA = common.ROOT.parent / "shared" / "data"

# name: config, extra overrides, --folds, metrics (emofuse name, probe name), targets from issue 6.
# Cheapest first.
ROWS = {
    "mosi": {"config": "configs/mosi.yaml", "overrides": [], "folds": False,
             "metrics": [("acc2_non0", "acc2_non0"), ("f1_non0", "f1_non0"), ("acc2_has0", "acc2_has0"),
                         ("acc7", "acc7"), ("mae", "mae"), ("corr", "corr")],
             "targets": {"acc2_non0": (">=", 80.0), "mae": ("<=", 0.95), "corr": (">=", 0.75)}},
    # configs/emodb.yaml standardises per speaker: its probe row does the same (bench/probe.py)
    "emodb": {"config": "configs/emodb.yaml", "overrides": [], "folds": True,
              "metrics": [("ua", "ua_speaker_norm"), ("wa", "wa_speaker_norm")], "targets": {"ua": (">=", 70.0)}},
    "meld-sentiment": {"config": "configs/meld.yaml", "overrides": ["corpus.protocol=sentiment", "train.name=meld-sentiment"],
                       "folds": False, "metrics": [("weighted_f1", "weighted_f1"), ("wa", "accuracy")],
                       "targets": {"weighted_f1": (">=", 67.0)}},
    "meld-emotion": {"config": "configs/meld.yaml", "overrides": [], "folds": False,
                     "metrics": [("weighted_f1", "weighted_f1"), ("wa", "accuracy")],
                     "targets": {"weighted_f1": (">=", 58.0)}},
}
RAW = ("mae", "corr")  # printed as they are; every other metric as a percentage


def emofuse(*args: str) -> tuple[float, str]:
    """Run the CLI; (seconds, stdout). A failure stops the benchmark with its message."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "emofuse.cli", *args, "--quiet"], cwd=common.ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"emofuse {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return time.perf_counter() - start, proc.stdout


def run_row(name: str, row: dict, data_dir: Path, runs: Path, seeds: int, log) -> dict:
    corpus = {"meld-emotion": "meld", "meld-sentiment": "meld", "mosi": "mosi", "emodb": "emodb"}[name]
    overrides = [f"corpus.root={data_dir / corpus}", f"train.runs={runs}", *row["overrides"]]
    log(f"[real-data] {name}: extract")
    extract_s, _ = emofuse("extract", row["config"], *overrides)
    log(f"[real-data] {name}: train, {seeds} seed(s){' per fold' if row['folds'] else ''}")
    train_s, out = emofuse("train", row["config"], *overrides, "--seeds", str(seeds), *(["--folds"] if row["folds"] else []))
    run_name = next((o.split("=", 1)[1] for o in row["overrides"] if o.startswith("train.name=")), None)
    if run_name is None:
        from emofuse.config import load_config

        run_name = load_config(common.ROOT / row["config"]).train.name
    summary = json.loads((runs / run_name / "summary.json").read_text())
    log(f"[real-data] {name}: {out.strip().splitlines()[-1]}")
    # the seeds as one model (outputs averaged), as `emofuse predict` uses a run
    emofuse("evaluate", str(runs / run_name))
    ensemble = json.loads((runs / run_name / "report.json").read_text()).get("ensemble")
    return {"protocol": summary["protocol"], "seeds": len(summary["seeds"]), "test": summary["test"], "ensemble": ensemble,
            "extract_seconds": extract_s, "train_seconds": train_s, "run": str(runs / run_name),
            "command": f"emofuse extract {row['config']} {' '.join(row['overrides'])} && emofuse train "
                       f"{row['config']} {' '.join(row['overrides'])} --seeds {seeds}{' --folds' if row['folds'] else ''}"}


def value(metric: str, v: float) -> str:
    return f"{v:.3f}" if metric in RAW else f"{v:.1f}"


def table(results: dict, probe: dict) -> str:
    lines = ["| row | metric | linear probe | emofuse, mean +- std | target | met | seeds as one model | "
             "minutes (extract + train) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        row = ROWS[name]
        minutes = f"{(r['extract_seconds'] + r['train_seconds']) / 60:.1f}"
        for k, (metric, probe_metric) in enumerate(row["metrics"]):
            scale = 1 if metric in RAW else 100
            mean, std = scale * r["test"][metric]["mean"], scale * r["test"][metric]["std"]
            p = probe.get(name, {}).get(probe_metric)
            target = row["targets"].get(metric)
            met = "-" if target is None else ("yes" if (mean >= target[1] if target[0] == ">=" else mean <= target[1]) else "no")
            label = f"{name} ({r['seeds']} seeds)" if k == 0 else ""
            probe_cell = value(metric, p) if p is not None else "-"
            target_cell = f"{target[0]} {value(metric, target[1])}" if target else "-"
            ens = (r.get("ensemble") or {}).get(metric)
            ens_cell = value(metric, scale * ens) if ens is not None else "-"
            lines.append(f"| {label} | {metric} | {probe_cell} | {value(metric, mean)} +- {value(metric, std)} | "
                         f"{target_cell} | {met} | {ens_cell} | {minutes if k == 0 else ''} |")
    return "\n".join(lines)


def probe_numbers(run_probe: bool, args, log) -> dict:
    """Probe numbers by row name, in the units of the table (percent, raw MAE and r)."""
    path = common.RESULTS / "probe.json"
    if run_probe:
        log("[real-data] linear probe (bench/probe.py)")
        subprocess.run([sys.executable, str(Path(__file__).parent / "probe.py"), "--threads", args.threads,
                        "--data", args.data], check=True, stdout=subprocess.DEVNULL)
    if not path.exists():
        return {}
    results = json.loads(path.read_text()).get("results", {})
    return {"meld-emotion": results.get("meld-emotion", {}), "meld-sentiment": results.get("meld-sentiment", {}),
            "mosi": results.get("mosi", {}), "emodb": results.get("emodb", {})}


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder (read only)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only", default=",".join(ROWS), help="comma-separated rows: " + ", ".join(ROWS))
    p.add_argument("--runs", default=str(common.ROOT / "runs" / "real"), help="where the runs go (kept)")
    p.add_argument("--no-probe", action="store_true", help="read the last probe.json instead of running the probe")
    args = p.parse_args(argv)
    data_dir = Path(args.data)
    if not data_dir.is_dir():
        msg = f"real_data: skipped: the real-data folder {data_dir} is absent"
        print(msg)
        return {"skipped": msg}
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown row(s): {', '.join(unknown)}")
    start = time.perf_counter()
    probe = probe_numbers(not args.no_probe, args, common.log)
    results = {}
    for n in names:  # the result file is rewritten after every row: a stopped run keeps what it finished
        results[n] = run_row(n, ROWS[n], data_dir, Path(args.runs), args.seeds, common.log)
        out = {"quick": args.quick, "seeds": args.seeds, "data": str(data_dir), "rows": results, "probe": probe,
               "seconds": time.perf_counter() - start, "table": table(results, probe)}
        common.write_result(NAME, out, args.out)
    print(out["table"])
    return out


if __name__ == "__main__":
    main()
