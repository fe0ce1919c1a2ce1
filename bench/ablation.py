"""What each CPU speed-up of the bf16 hf audio path is worth: the extraction pipeline with one of
them undone, each variant in a fresh process.

Why fresh processes: oneDNN keeps one cache of built kernels per process, keyed by op and shape,
not by model. Rows of bench/extraction.py run one after another in one process, so a row met the
kernels the row before it had built for the same shapes, and its A/B against the headline row
measured its position more than its code (its "fused GELU" rows read 0.94-0.96x in three runs;
separate processes gave 1.01-1.08x). Here every run starts cold, as a user's `emofuse extract`
does, on clips that no other run of its process has seen, and then runs the same clips again
(warm: the shapes of a large corpus repeat).

Variants (each undoes one thing of the current code; "current" undoes nothing):
  F.linear          the Linear layers on F.linear (no oneDNN-packed weights, hence no fused GELU
                    and no packed attention either)
  GELU not fused    each feed-forward GELU a separate pass (hf.fuse_gelu off)
  transformers' attention + pos conv
                    hf.PackedSelfAttention and hf.ChannelsLastConv1d off
Per clip set (seed) the variants run in alternating order; the table gives audio seconds per
second, cold and warm, and current / variant.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "ablation"
VARIANTS = ["current", "F.linear", "GELU not fused", "transformers' attention + pos conv"]


def undo(variant: str) -> None:
    """Switch off, in this process, what `variant` undoes (before any encoder is built)."""
    from emofuse.extract.encoders import hf

    if variant == "F.linear":
        hf.onednn_packing_works = lambda: False
    elif variant == "GELU not fused":
        hf.fuse_gelu = lambda model: 0
    elif variant == "transformers' attention + pos conv":
        hf.pack_self_attention = hf.channels_last_grouped_convs = lambda model: 0
    elif variant != "current":
        raise ValueError(variant)


def child(variant: str, model: str, clips_dir: str, threads: str, out_dir: str) -> dict:
    """One variant over one clip set: cold, then warm. Printed as one JSON line."""
    from extraction import run_pipeline

    from emofuse.corpora.base import Utterance
    from emofuse.extract.encoders.base import build_encoder

    common.quiet_transformers()
    common.setup_threads(threads)
    undo(variant)
    enc = build_encoder("audio", {"backend": "hf", "path": model, "dtype": "bfloat16", "device": "cpu"})
    paths = sorted(Path(clips_dir).glob("*.wav"))
    durations = json.loads((Path(clips_dir) / "durations.json").read_text())
    audio_s = sum(durations[p.name] for p in paths)
    utts = [Utterance(id=p.stem, audio=str(p)) for p in paths]
    speeds = {}
    for run in ("cold", "warm"):
        out = Path(out_dir) / run
        shutil.rmtree(out, ignore_errors=True)
        seconds, _ = run_pipeline(utts, enc, out, 16000 * 60)
        speeds[run] = audio_s / seconds
    return {"variant": variant, "audio_s": audio_s, "linear_kernel": enc.linear_kernel, **speeds}


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--clips", type=int, default=48, help="clips of 2-15 s per clip set")
    p.add_argument("--sets", type=int, default=2, help="clip sets (seeds); variants alternate order per set")
    p.add_argument("--child", nargs=4, metavar=("VARIANT", "MODEL", "CLIPS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.child[1], args.child[2], args.threads, args.child[3])))
        return {}
    if args.device != "cpu":
        p.error("the ablation is of the CPU path")

    threads = common.setup_threads(args.threads)  # chosen once here, passed to every child
    n, sets, lo, hi = (6, 1, 2.0, 4.0) if args.quick else (args.clips, args.sets, 2.0, 15.0)
    runs = []
    with common.temp_dir(args.tmp, NAME) as tmp:
        model = common.make_wav2vec2(tmp / "wav2vec2-base")
        for s in range(sets):
            clips = common.write_clips(tmp / f"clips{s}", n, lo, hi, seed=100 + s)
            (tmp / f"clips{s}" / "durations.json").write_text(json.dumps({p.name: d for p, d in clips}))
            order = VARIANTS if s % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--threads", str(threads["threads"]), "--child", variant,
                                       str(model), str(tmp / f"clips{s}"), str(tmp / "out")],
                                      stdout=subprocess.PIPE, text=True, check=True)
                line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
                result = {**json.loads(line[len("RESULT "):]), "set": s, "wall_s": time.perf_counter() - t0}
                runs.append(result)
                common.log(f"[ablation] set {s + 1}: {variant}: cold {result['cold']:.1f}, warm {result['warm']:.1f} "
                           f"audio s/s ({result['linear_kernel']})")

    by = {(r["variant"], r["set"]): r for r in runs}
    rows = []
    for variant in VARIANTS:
        row = {"variant": variant, "linear_kernel": by[(variant, 0)]["linear_kernel"]}
        for run in ("cold", "warm"):
            row[run] = [by[(variant, s)][run] for s in range(sets)]
            # current / variant per clip set: > 1 when what the variant undoes helps
            row[f"current_over_{run}"] = [by[("current", s)][run] / by[(variant, s)][run] for s in range(sets)]
        rows.append(row)
    data = {"quick": args.quick, "threads": threads, "clips_per_set": n, "clip_seconds": [lo, hi], "sets": sets, "machine": common.machine(),
            "runs": runs, "rows": rows}
    path = common.write_result(NAME, data, args.out)

    def fmt(xs, spec=".1f", suffix=""):
        return " / ".join(f"{x:{spec}}{suffix}" for x in xs)

    table = [[r["variant"], fmt(r["cold"]), fmt(r["warm"]), fmt(r["current_over_cold"], ".2f", "x"),
              fmt(r["current_over_warm"], ".2f", "x"), f"{statistics.geometric_mean(r['current_over_cold'] + r['current_over_warm']):.2f}x"]
             for r in rows]
    print(common.table(table, ["variant", "cold s/s", "warm s/s", "current / it, cold", "current / it, warm", "geo. mean"],
                       f"Ablation of the bf16 CPU path (wav2vec2-base size, {n} clips of {lo:g}-{hi:g} s per set, {sets} set(s), "
                       f"{threads['threads']} thread(s), each run a fresh process)" + (" [QUICK: not a measurement]" if args.quick else "")))
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
