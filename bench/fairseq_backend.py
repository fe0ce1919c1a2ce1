"""The fairseq backend's forward on a CPU, bf16 and float32, next to fairseq's own forward under autocast.

The paper's checkpoints load through emofuse's `fairseq` backend. This times one forward of the
same batch (three 8 s clips of one length) through:
  - fairseq's own forward under bf16 autocast (what the backend ran before it prepared the model:
    weights recast on every call, fairseq's convs, its first layer fed a (T, B, C) transpose);
  - the backend in bf16 now (weights cast once and packed, emofuse's channels-last conv encoder,
    a contiguous first-layer input) and in float32 (fairseq's exact path);
  - the `hf` backend at the same size in bf16, for reference;
and wav2vec 1.0 at the size of the paper's wav2vec_large.pt the same way (in bf16 its convs run as
Wav2vec1Features). Then the whole extraction (decode, encode, write) of clips of 2-15 s for a
group-norm wav2vec 2.0 base, a HuBERT base and wav2vec 1.0 large, as they run now (padded, masked
batches) and as before (one exact length per forward; in float32, fairseq's convs), in interleaved
rounds.
Random weights in checkpoints saved as fairseq loads them (the FLOPs are the real models'). Needs
the fairseq extra (`make setup-fairseq`); not part of `make bench` (~7 min).
Results: results/fairseq_backend.json.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository on sys.path)

NAME = "fairseq_backend"


def fairseq_checkpoint(path: Path, arch: str, **model_cfg) -> Path:
    """A random-weight fairseq model saved with the entries fairseq's loader reads."""
    import torch
    from fairseq.models import MODEL_DATACLASS_REGISTRY, MODEL_REGISTRY

    torch.manual_seed(0)
    model = MODEL_REGISTRY[arch](MODEL_DATACLASS_REGISTRY[arch](**model_cfg))
    cfg = {"model": {"_name": arch, **model_cfg}, "task": {"_name": "audio_pretraining", "data": str(path.parent)}}
    history = [{"criterion_name": "Wav2vecCriterion", "optimizer_name": "FairseqAdam", "lr_scheduler_state": {},
                "num_updates": 0}]
    torch.save({"args": None, "cfg": cfg, "model": model.state_dict(), "optimizer_history": history,
                "extra_state": {"train_iterator": {"epoch": 1}}}, path)
    return path


def hubert_checkpoint(path: Path) -> Path:
    """A random-weight HuBERT base (group-norm convs, as hubert_base_ls960.pt) saved as fairseq saves
    it, with its label dictionary in task_state (the label folder is gone once it is saved)."""
    import warnings

    import torch
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    labels = path.parent / "labels"
    labels.mkdir(exist_ok=True)
    (labels / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(500)))
    argv = [str(path.parent), "--task", "hubert_pretraining", "--labels", '["km"]', "--label-dir", str(labels),
            "--label-rate", "50", "--arch", "hubert", "--criterion", "hubert"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hydra's deprecation notices
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), input_args=argv))
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    task.dictionaries  # noqa: B018 - loaded, so that task_state holds them
    state = {"args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
             "model": model.state_dict(), "criterion": None, "task_state": task.state_dict(),
             "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                                    "lr_scheduler_state": {}, "num_updates": 0}], "extra_state": {}}
    checkpoint_utils.torch_persistent_save(state, str(path))
    (labels / "dict.km.txt").unlink()
    return path


def as_before_masking(encoder, fairseq_convs: bool):
    """The encoder as it ran before wav2vec 2.0 / HuBERT / wav2vec 1.0 took padded batches in every
    dtype (2026-11-27): inputs of one exact length per forward, and with fairseq_convs fairseq's own
    conv feature extractor (float32 ran it then)."""
    from emofuse.extract.encoders.fairseq_backend import build_fairseq_model, read_checkpoint

    encoder.masked = False
    if fairseq_convs:
        model, _, _ = build_fairseq_model(read_checkpoint(encoder.checkpoint, False), encoder.checkpoint, {}, False)
        encoder.model.feature_extractor = model.feature_extractor.eval().requires_grad_(False)
        encoder.feature_encoder = "fairseq"
    return encoder


def pipeline_rows(tmp: Path, checkpoints: dict, n_clips: int, rounds: int) -> list[dict]:
    """Clips of 2-15 s through the whole extraction (decode, encode, write), each encoder as it runs
    now and as before padded batches, in interleaved rounds."""
    import extraction  # bench/extraction.py: its forward counter and pipeline runner

    from emofuse.corpora.base import Utterance
    from emofuse.extract.encoders.fairseq_backend import FairseqEncoder

    clips = common.write_clips(tmp / "clips", n_clips, 2.0, 15.0, seed=1)
    utts = [Utterance(id=p.stem, audio=str(p)) for p, _ in clips]
    audio = sum(d for _, d in clips)
    budget = 16000 * 60  # the config default
    rows = []
    for model, dtype in [("wav2vec 2.0 base", "float32"), ("HuBERT base", "float32"), ("HuBERT base", "bfloat16"),
                         ("wav2vec 1.0 large", "float32"), ("wav2vec 1.0 large", "bfloat16")]:
        path = checkpoints[model]
        encoders = {"now": FairseqEncoder(path, dtype=dtype, device="cpu"),
                    "before": as_before_masking(FairseqEncoder(path, dtype=dtype, device="cpu"), dtype == "float32")}
        stats = {k: extraction.instrument(e) for k, e in encoders.items()}
        extraction.run_pipeline(utts[:4], encoders["now"], tmp / "warm", budget)  # oneDNN's first calls
        seconds = {k: [] for k in encoders}
        for r in range(rounds):
            for k, e in encoders.items():
                stats[k].update(forwards=0, real=0, padded=0)
                s, _ = extraction.run_pipeline(utts, e, tmp / f"out-{len(rows)}-{k}-{r}", budget)
                seconds[k].append(s)
                common.log(f"[{NAME}] pipeline {model} {dtype} {k}, round {r + 1}: {audio / s:.1f} audio s/s, "
                           f"{stats[k]['forwards']} forwards")
        for k in encoders:
            rows.append({"model": model, "dtype": dtype, "path": k, "clips": n_clips, "audio_s": audio,
                         "seconds": seconds[k], "audio_per_s": [audio / s for s in seconds[k]],
                         "forwards": stats[k]["forwards"], "padding_fraction": extraction.padding_fraction(stats[k]),
                         "feature_encoder": encoders[k].feature_encoder})
        now, before = (rows[-2]["seconds"], rows[-1]["seconds"])
        rows[-2]["speedup_per_round"] = [b / n for n, b in zip(now, before)]
    return rows


def seconds_per_forward(encoder, clips, repeats: int) -> float:
    encoder._forward(clips)  # warm-up: oneDNN primitives for these shapes
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder._forward(clips)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per row (median)")
    p.add_argument("--clips", type=int, default=30, help="clips of 2-15 s for the pipeline rows")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the pipeline rows")
    p.add_argument("--no-pipeline", action="store_true", help="the forward rows only (~1.5 min)")
    args = p.parse_args(argv)
    import numpy as np

    from emofuse.extract.encoders.fairseq_backend import FairseqEncoder, import_fairseq
    from emofuse.extract.encoders.hf import HFEncoder

    import_fairseq()  # a clear message when the extra is missing
    threads = common.setup_threads(args.threads)
    seconds = 2.0 if args.quick else 8.0
    repeats = 1 if args.quick else args.repeats
    clips = [np.random.default_rng(i).standard_normal(int(16000 * seconds)).astype(np.float32) for i in range(3)]
    audio = 3 * seconds

    rows = []

    def row(model: str, path: str, dtype: str, encoder, note: str = "") -> None:
        s = seconds_per_forward(encoder, clips, repeats)
        rows.append({"model": model, "path": path, "dtype": dtype, "seconds": s, "audio_per_s": audio / s,
                     "feature_encoder": getattr(encoder, "feature_encoder", ""), "note": note})
        common.log(f"[{NAME}] {model}, {path}, {dtype}: {s:.3f} s per forward ({audio / s:.1f} s of audio per s)")

    with common.temp_dir(args.tmp, NAME) as tmp:
        w2v2 = str(fairseq_checkpoint(tmp / "wav2vec2_base.pt", "wav2vec2"))
        # fairseq's own model (its convs too, which float32 no longer runs), under a bf16 spec's autocast
        before = as_before_masking(FairseqEncoder(w2v2, dtype="float32", device="cpu"), fairseq_convs=True)
        before.dtype = "bfloat16"
        row("wav2vec 2.0 base", "fairseq's forward under autocast (before)", "bfloat16", before)
        del before
        row("wav2vec 2.0 base", "emofuse fairseq backend", "bfloat16", FairseqEncoder(w2v2, dtype="bfloat16", device="cpu"))
        row("wav2vec 2.0 base", "emofuse fairseq backend", "float32", FairseqEncoder(w2v2, dtype="float32", device="cpu"))
        hf = common.make_wav2vec2(tmp / "hf_wav2vec2_base")
        row("wav2vec 2.0 base", "emofuse hf backend", "bfloat16", HFEncoder(str(hf), dtype="bfloat16", device="cpu"))

        # the paper's wav2vec_large.pt: 7 feature convs and 12 aggregator convs of 512 channels
        large = dict(conv_feature_layers="[(512, 10, 5), (512, 8, 4)] + [(512, 4, 2)] * 3 + [(512, 1, 1)] * 2",
                     conv_aggregator_layers="[" + ", ".join(f"(512, {k}, 1)" for k in range(2, 14)) + "]",
                     skip_connections_agg=True, residual_scale=0.5, log_compression=True, prediction_steps=12,
                     infonce=False)  # a criterion setting the config would otherwise look up
        w2v1 = str(fairseq_checkpoint(tmp / "wav2vec_large.pt", "wav2vec", **large))
        before = as_before_masking(FairseqEncoder(w2v1, dtype="float32", device="cpu"), fairseq_convs=True)
        before.dtype = "bfloat16"
        row("wav2vec 1.0 large", "fairseq's forward under autocast (before)", "bfloat16", before)
        del before
        for dtype in ("bfloat16", "float32"):
            row("wav2vec 1.0 large", "emofuse fairseq backend", dtype, FairseqEncoder(w2v1, dtype=dtype, device="cpu"))

        pipeline = []
        if not args.no_pipeline:
            hubert = str(hubert_checkpoint(tmp / "hubert_base.pt"))
            pipeline = pipeline_rows(tmp, {"wav2vec 2.0 base": w2v2, "HuBERT base": hubert, "wav2vec 1.0 large": w2v1},
                                     4 if args.quick else args.clips, 1 if args.quick else args.rounds)

    for r in rows:  # against the "before" row of its model
        r["speedup_vs_before"] = next(b["seconds"] for b in rows if b["model"] == r["model"]) / r["seconds"]
    print(common.table(
        [[r["model"], r["path"], r["dtype"], f"{r['seconds']:.3f}", f"{r['audio_per_s']:.1f}",
          f"{r['speedup_vs_before']:.2f}x"] for r in rows],
        ["model", "path", "dtype", "s per forward", "audio s/s", "vs before"],
        f"fairseq backend on the CPU ({threads['threads']} threads; three {seconds:.0f} s clips per forward)"))
    if pipeline:
        print(common.table(
            [[r["model"], r["dtype"], r["path"], r["feature_encoder"], " / ".join(f"{x:.1f}" for x in r["audio_per_s"]),
              r["forwards"], f"{100 * (r['padding_fraction'] or 0):.1f}%",
              " / ".join(f"{x:.2f}x" for x in r.get("speedup_per_round", []))] for r in pipeline],
            ["model", "dtype", "path", "feature encoder", "audio s/s (rounds)", "forwards", "padding", "now vs before"],
            f"whole extraction, {pipeline[0]['clips']} clips of 2-15 s ({pipeline[0]['audio_s']:.0f} s of audio)"))
    result = {"benchmark": NAME, "machine": common.machine(), "quick": args.quick, "threads": threads,
              "clips": 3, "clip_seconds": seconds, "repeats": repeats, "rows": rows, "pipeline_rows": pipeline}
    common.log(f"wrote {common.write_result(NAME, result, args.out)}")
    return result


if __name__ == "__main__":
    main()
