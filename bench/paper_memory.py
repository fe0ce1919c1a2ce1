"""Where the `paper` preset's training memory goes on a CPU: the longest batch of bench/training.py.

bench/training.py reports the `paper` training process at ~6.5 GiB peak RSS while its data path
stays at 0.66 GiB. This script trains two steps of the `paper` SSEFT on that epoch's longest batch
alone (32 utterances of 30 s: 1,500 wav2vec frames of 512-d, 300 FabNet frames of 256-d, 100
RoBERTa-large tokens of 1024-d; random values, no cache), each setting in its own process so that
each peak RSS is its own: the preset as it is, without attention dropout, and with the batch run
as micro-batches of 8, 4, 2 and 1 (`train.step_frames` 12,000 to 1,500: the same gradient, a
micro-batch's activations at a time). A last measurement is one (32, 4 heads, 1500, 128)
attention with backward, with and without dropout: on a CPU,
scaled_dot_product_attention with dropout falls back to the kernel that materialises the
(batch, heads, T, T) probabilities.

    python bench/paper_memory.py          # ~3.5 min; results/paper_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "paper_memory"
LENGTHS = {"audio": 1500, "text": 100, "video": 300}
WIDTHS = {"audio": 512, "text": 1024, "video": 256}
BATCH = 32


def paper_steps(attn_dropout: float, step_frames: int = 0) -> dict:
    """Two training steps as emofuse.fuse.train.fit takes them (train_step: L1 loss, micro-batches
    under train.step_frames), clipping and the optimizer step."""
    import time

    import torch

    from emofuse.fuse.model import SSEFT, FusionConfig
    from emofuse.fuse.train import adamw, train_step

    cfg = FusionConfig(modalities=list(LENGTHS), input_dims=WIDTHS, num_layers_in={}, num_outputs=1,
                       preset="paper", attn_dropout=attn_dropout)
    torch.manual_seed(0)
    model = SSEFT(cfg).train()
    opt = adamw(model, lr=3e-4, weight_decay=0.01)
    feats = {m: torch.randn(BATCH, t, WIDTHS[m]) for m, t in LENGTHS.items()}
    masks = {m: torch.ones(BATCH, t, dtype=torch.bool) for m, t in LENGTHS.items()}
    present = torch.ones(BATCH, len(LENGTHS), dtype=torch.bool)
    y = torch.randn(BATCH)
    start = time.perf_counter()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        train_step(model, feats, masks, present, y, "regression", step_frames=step_frames)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    what = f"paper, 2 training steps, attn_dropout {attn_dropout}"
    if step_frames:
        what += f", train.step_frames {step_frames} ({max(1, step_frames // max(LENGTHS.values()))} per micro-batch)"
    return {"what": what, "peak_rss_gib": common.peak_rss_bytes() / 2**30,
            "seconds_per_step": (time.perf_counter() - start) / 2}


def attention(dropout: float) -> dict:
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.randn(BATCH, 4, LENGTHS["audio"], 128, requires_grad=True) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, dropout_p=dropout).sum().backward()
    return {"what": f"one attention (32, 4, 1500, 128) with backward, dropout {dropout}",
            "peak_rss_gib": common.peak_rss_bytes() / 2**30}


JOBS = {"paper-0.1": (paper_steps, 0.1), "paper-0.0": (paper_steps, 0.0),
        "paper-0.1-micro8": (lambda d: paper_steps(d, 12000), 0.1),
        "paper-0.1-micro4": (lambda d: paper_steps(d, 6000), 0.1),
        "paper-0.1-micro2": (lambda d: paper_steps(d, 3000), 0.1),
        "paper-0.1-micro1": (lambda d: paper_steps(d, 1500), 0.1),
        "attention-0.1": (attention, 0.1), "attention-0.0": (attention, 0.0)}


def main(argv=None) -> None:
    p = common.parser(__doc__)
    p.add_argument("--job", default=None, choices=list(JOBS), help=argparse.SUPPRESS)  # one measurement (internal)
    args = p.parse_args(argv)
    if args.job:  # one measurement, in a process of its own
        common.setup_threads("2" if args.threads == "auto" else args.threads)
        fn, value = JOBS[args.job]
        print(json.dumps(fn(value)))
        return
    rows = []
    for job in JOBS:
        out = subprocess.run([sys.executable, __file__, "--job", job, "--threads", args.threads],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        common.log(f"[paper-memory] {rows[-1]['what']}: peak RSS {rows[-1]['peak_rss_gib']:.2f} GiB")
    common.write_result(NAME, {"rows": rows}, args.out)
    print("| measurement | peak RSS | s per step |\n|---|---:|---:|")
    for r in rows:
        step = f"{r['seconds_per_step']:.1f}" if "seconds_per_step" in r else "-"
        print(f"| {r['what']} | {r['peak_rss_gib']:.2f} GiB | {step} |")


if __name__ == "__main__":
    main()
