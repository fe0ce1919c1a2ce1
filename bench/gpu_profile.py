"""Where the time of GPU extraction goes: the hf audio path at wav2vec2-base size (random weights),
bf16 autocast, end to end (decode + prepare + encode + write) through the real pipeline.

On an H200 (2026-11-26) this pipeline ran 200 clips of 2-15 s in 3.6 s, 1.1% of the bf16 FLOP
limit: host-bound. This run, for bench/gpu_check.sh, measures:

  1. the pipeline as shipped (one forward per length batch, padded to its longest; full shards
     written by a background thread; on a GPU the feature encoder on whole inputs and the
     positional conv in float32) at batch budgets of 60, 240 and 960 s, against all of that as
     before this change (each input padded by its own length, so only inputs padded alike shared
     a forward; shards written in the encoding thread; tiles; bf16 positional conv), against
     tiles alone and the bf16 positional conv alone, and the layer-norm variant with our convs
     and with transformers'; in two interleaved rounds after a warm-up of every row;
  2. where the main thread's time goes, as shipped and as before: the model's forward call (host: Python
     and kernel launches), waiting for the GPU (a synchronize after the call), the rest of encode
     (stacking, the copy to the host, unpadding), the store's writer, and waiting for the
     preparing threads; and the threads' own time decoding and preparing;
  3. one forward of three 8 s clips: host time of the call against the time until the GPU is
     done, the feature encoder's share, kernel launches (torch.profiler), the positional conv
     alone, and new input lengths against lengths seen before (cuDNN / cuBLAS choices).

Not a test: it needs a GPU to mean anything (it runs on a CPU too, as a smoke test).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository on sys.path)

NAME = "gpu_profile"
BUDGET = 16000 * 60  # the config default: 60 s of padded audio per batch


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StageTimes:
    """Bench-only wrappers around one encoder and the store writer that add up where the main
    thread spends its time (and the preparing threads theirs)."""

    def __init__(self, encoder, device: str):
        self.device, self.lock = device, threading.Lock()
        self.t = {"forward_call": 0.0, "gpu_wait": 0.0, "encode": 0.0, "write": 0.0, "prepare_threads": 0.0}
        self.forwards = 0
        model, prepare, encode = encoder.model, encoder.prepare, encoder.encode
        forward = model.forward

        def timed_forward(*a, **k):
            t0 = time.perf_counter()
            out = forward(*a, **k)
            t1 = time.perf_counter()
            sync(device)
            self.t["forward_call"] += t1 - t0
            self.t["gpu_wait"] += time.perf_counter() - t1
            self.forwards += 1
            return out

        def timed_prepare(utt):
            t0 = time.perf_counter()
            try:
                return prepare(utt)
            finally:
                with self.lock:
                    self.t["prepare_threads"] += time.perf_counter() - t0

        def timed_encode(items):
            t0 = time.perf_counter()
            try:
                return encode(items)
            finally:
                self.t["encode"] += time.perf_counter() - t0

        model.forward, encoder.prepare, encoder.encode = timed_forward, timed_prepare, timed_encode

    @contextlib.contextmanager
    def timing_writes(self):
        from emofuse.cache.store import ShardWriter

        add = ShardWriter.add

        def timed_add(writer, uid, features):
            t0 = time.perf_counter()
            try:
                return add(writer, uid, features)
            finally:
                self.t["write"] += time.perf_counter() - t0

        ShardWriter.add = timed_add
        try:
            yield
        finally:
            ShardWriter.add = add

    def split(self, total: float) -> dict:
        t = self.t
        rest_of_encode = t["encode"] - t["forward_call"] - t["gpu_wait"]
        return {"total_s": total, "forwards": self.forwards, "forward_call_s": t["forward_call"],
                "gpu_wait_s": t["gpu_wait"], "rest_of_encode_s": rest_of_encode, "write_s": t["write"],
                "main_other_s": total - t["encode"] - t["write"], "prepare_threads_s": t["prepare_threads"]}


def run_pipeline(encoder, clips, out: Path, workers: int = 2, budget: int = BUDGET, background_writes: bool = True) -> float:
    from emofuse.cache.store import ShardWriter
    from emofuse.corpora.base import Utterance
    from emofuse.extract.pipeline import extract_modality

    utts = [Utterance(id=p.stem, audio=str(p)) for p, _ in clips]
    encoder.full_spec()
    ShardWriter.BACKGROUND = background_writes
    start = time.perf_counter()
    try:
        result = extract_modality(utts, encoder, out, budget=budget, workers=workers, progress=False, log=lambda *a: None)
    finally:
        ShardWriter.BACKGROUND = True
    seconds = time.perf_counter() - start
    if result.failed:
        raise RuntimeError(f"{result.failed} utterances failed: {result.failure_reasons}")
    return seconds


def build(folder: Path, device: str, dtype: str = "bfloat16"):
    from emofuse.extract.encoders.base import build_encoder

    return build_encoder("audio", {"backend": "hf", "path": str(folder), "device": device, "dtype": dtype})


def one_forward(encoder, inputs, device: str, repeats: int) -> dict:
    """Host time of the forward call, and the time until the GPU is done, per forward (median)."""
    import numpy as np
    import torch

    from emofuse.extract.encoders.hf import DTYPES, precision

    x = torch.from_numpy(np.stack(inputs)).to(device)
    calls, totals, fe_calls, fe_totals = [], [], [], []
    with torch.inference_mode(), precision(DTYPES[encoder.dtype], device):
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            encoder.model(input_values=x, attention_mask=torch.ones_like(x, dtype=torch.long))
            calls.append(time.perf_counter() - t0)
            sync(device)
            totals.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            encoder.model.feature_extractor(x)
            fe_calls.append(time.perf_counter() - t0)
            sync(device)
            fe_totals.append(time.perf_counter() - t0)
    med = lambda v: float(np.median(v[1:] if len(v) > 2 else v))  # noqa: E731  (the first is a warm-up)
    return {"call_s": med(calls), "total_s": med(totals), "fe_call_s": med(fe_calls), "fe_total_s": med(fe_totals)}


def launches(encoder, inputs, device: str) -> dict:
    """torch.profiler over 3 forwards: kernel launches per forward and the ops with the most host time."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from emofuse.extract.encoders.hf import DTYPES, precision

    x = torch.from_numpy(np.stack(inputs)).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.inference_mode(), precision(DTYPES[encoder.dtype], device):
        encoder.model(input_values=x)
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(3):
                encoder.model(input_values=x)
            sync(device)
    events = prof.key_averages()
    launch_names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    n_launch = sum(e.count for e in events if e.key in launch_names)
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync"))
    table = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    return {"kernel_launches_per_forward": n_launch / 3, "sync_or_copy_calls_per_forward": syncs / 3, "table": table}


def new_lengths(encoder, device: str, n: int = 8) -> dict:
    """Forwards of 3 x (6 s + i * 0.25 s) for i < n: every length new, then the same lengths again."""
    import numpy as np

    rng = np.random.default_rng(0)
    passes = []
    for _ in range(2):
        times = []
        for i in range(n):
            length = 16000 * 6 + 4000 * i
            inputs = [rng.standard_normal(length).astype(np.float32) for _ in range(3)]
            sync(device)
            t0 = time.perf_counter()
            encoder._forward_padded(inputs, length)
            times.append(time.perf_counter() - t0)
        passes.append(float(np.median(times)))
    return {"first_time_s": passes[0], "seen_before_s": passes[1]}


def padded_by_own_length(encoder):
    """The padding policy before 2026-11-27, for an A/B in one run (bench-only): each masked audio
    input padded to the next 0.25 s of its own length, and only inputs padded alike sharing a
    forward (75 forwards for 200 clips of 2-15 s)."""
    from collections import defaultdict

    from emofuse.extract.encoders import hf

    def forward(inputs, budget=None):
        groups = defaultdict(list)
        for i, x in enumerate(inputs):
            groups[encoder._padded_length(len(x))].append(i)
        outputs = [None] * len(inputs)
        for n, group in sorted(groups.items()):
            for part in hf._split_by_budget(group, [n] * len(group), hf.FORWARD_BUDGET["audio"]):
                for i, out in zip(part, encoder._forward_padded([inputs[i] for i in part], n)):
                    outputs[i] = out
        return outputs

    encoder._forward = forward
    return encoder


def with_tiles(encoder, tile_frames: int = 256):
    """The feature encoder in tiles of 256 frames, as on a CPU (bench-only A/B)."""
    encoder.model.feature_extractor.tile_frames = tile_frames
    return encoder


def bf16_grouped_convs(encoder):
    """The grouped (positional) convs back under autocast, with bf16 weights (bench-only A/B)."""
    from emofuse.extract.encoders.hf import Float32Conv1d

    for parent in list(encoder.model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Float32Conv1d):
                conv = torch_conv1d_like(child)
                setattr(parent, name, conv)
    return encoder


def torch_conv1d_like(f32):
    import torch

    out_c, in_per_group, k = f32.weight.shape
    conv = torch.nn.Conv1d(in_per_group * f32.groups, out_c, k, f32.stride, f32.padding, f32.dilation, f32.groups,
                           bias=f32.bias is not None).to(f32.weight.device)
    with torch.no_grad():
        conv.weight.data = f32.weight.detach().to(torch.bfloat16)
        if f32.bias is not None:
            conv.bias.data = f32.bias.detach().to(torch.bfloat16)
    return conv.requires_grad_(False)


def before_this_session(encoder):
    """All four: each input padded by its own length, tiles, bf16 positional conv (and the caller
    writes shards in the encoding thread)."""
    return padded_by_own_length(with_tiles(bf16_grouped_convs(encoder)))


def positional_conv(encoder, device: str, frames: int = 400, repeats: int = 10) -> float:
    """GPU time of the positional conv embedding alone (768 channels, kernel 128, 16 groups) on
    3 x `frames` frames, per call (median)."""
    import numpy as np
    import torch

    from emofuse.extract.encoders.hf import DTYPES, precision

    conv = encoder.model.encoder.pos_conv_embed
    x = torch.randn(3, frames, encoder.dim, device=device)
    times = []
    with torch.inference_mode(), precision(DTYPES[encoder.dtype], device):
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            conv(x)
            sync(device)
            times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--clips", type=int, default=200)
    args = p.parse_args(argv)
    import numpy as np
    import torch

    import extraction  # bench/extraction.py: its forward counter

    common.quiet_transformers()
    dev = args.device
    n = 12 if args.quick else args.clips
    repeats = 3 if args.quick else 11
    rate = common.matmul_rate("bfloat16", dev, seconds=0.3 if args.quick else 1.0)["flops_per_s"]
    gflop_per_s_audio = 14.9  # wav2vec2-base, counted with torch's flop counter (bench/extraction.py)
    data = {"device": dev, "gpu": torch.cuda.get_device_name(0) if dev.startswith("cuda") else None,
            "matmul_bf16_flops_per_s": rate, "clips": n}
    with common.temp_dir(args.tmp, NAME) as tmp:
        clips = common.write_clips(tmp / "clips", n, 2.0, 15.0)
        audio_s = sum(d for _, d in clips)
        data["audio_s"] = audio_s
        group = common.make_wav2vec2(tmp / "group")
        layer = common.make_wav2vec2(tmp / "layer", feat_extract_norm="layer")

        def transformers_convs(encoder):
            encoder.model.feature_extractor = encoder.model.feature_extractor.hf
            return encoder

        # name -> (encoder, pipeline options); each encoder counts its forwards and padding
        variants = {
            "as shipped (60 s budget)": (build(group, dev), {}),
            "as shipped, 240 s budget": (build(group, dev), {"budget": 4 * BUDGET}),
            "as shipped, 960 s budget": (build(group, dev), {"budget": 16 * BUDGET}),
            "before: own-length padding, foreground writes, tiles, bf16 pos conv":
                (before_this_session(build(group, dev)), {"background_writes": False}),
            "as shipped but tiles of 256 frames": (with_tiles(build(group, dev)), {}),
            "as shipped but bf16 positional conv": (bf16_grouped_convs(build(group, dev)), {}),
            "layer-norm variant": (build(layer, dev), {}),
            "layer-norm variant, transformers' convs": (transformers_convs(build(layer, dev)), {}),
        }
        stats = {name: extraction.instrument(enc) for name, (enc, _) in variants.items()}
        index = {name: i for i, name in enumerate(variants)}  # output folder names
        for name, (enc, kw) in variants.items():  # warm-up: every batch shape once (cuBLAS / cuDNN choices)
            run_pipeline(enc, clips, tmp / f"warm-{index[name]}", **kw)
        for s in stats.values():
            s.update(forwards=0, items=0, real=0, padded=0)
        # Two rounds, the second in reverse order, so that a drift of the machine falls on every row.
        seconds = {name: [] for name in variants}
        for r in range(2):
            for name in list(variants)[:: 1 if r == 0 else -1]:
                enc, kw = variants[name]
                seconds[name].append(run_pipeline(enc, clips, tmp / f"out-{r}-{index[name]}", **kw))
                common.log(f"[gpu-profile] round {r + 1}: {name}: {audio_s / seconds[name][-1]:.0f} audio s/s")
        rows = {}
        for name, times in seconds.items():
            mean = sum(times) / len(times)
            rows[name] = {"seconds": times, "audio_s_per_s": audio_s / mean, "ms_per_clip": mean / n * 1e3,
                          "of_bf16_limit": audio_s / mean * gflop_per_s_audio * 1e9 / rate,
                          "forwards": stats[name]["forwards"] // 2,
                          "padding_fraction": extraction.padding_fraction(stats[name])}
        data["rows"] = rows

        for name in [list(variants)[0], list(variants)[3]]:  # where the main thread's time goes, now and before
            enc, kw = variants[name]
            stages = StageTimes(enc, dev)
            with stages.timing_writes():
                total = run_pipeline(enc, clips, tmp / f"stages-{index[name]}", **kw)
            data.setdefault("stages", {})[name] = stages.split(total)
            common.log(f"[gpu-profile] stages, {name}: {data['stages'][name]}")

        x8 = [np.random.default_rng(i).standard_normal(16000 * 8).astype(np.float32) for i in range(3)]
        plain = build(group, dev)
        data["forward_3x8s"] = one_forward(plain, x8, dev, repeats)
        data["profile_3x8s"] = launches(plain, x8, dev)
        data["new_lengths"] = new_lengths(plain, dev, n=3 if args.quick else 8)
        data["positional_conv_3x400_frames_s"] = {"bfloat16 as shipped": positional_conv(plain, dev),
                                                  "bfloat16 under autocast": positional_conv(bf16_grouped_convs(build(group, dev)), dev),
                                                  "float32": positional_conv(build(group, dev, "float32"), dev)}
        data["layer_norm_forward_3x8s"] = {"ours": one_forward(build(layer, dev), x8, dev, repeats),
                                           "transformers": one_forward(variants["layer-norm variant, transformers' convs"][0],
                                                                       x8, dev, repeats)}
        for key in ("forward_3x8s", "new_lengths", "positional_conv_3x400_frames_s", "layer_norm_forward_3x8s"):
            common.log(f"[gpu-profile] {key}: {data[key]}")
        common.log(f"[gpu-profile] kernel launches per forward: {data['profile_3x8s']['kernel_launches_per_forward']:.0f}")
        print(data["profile_3x8s"]["table"])
    common.write_result(NAME, data, args.out)
    headers = ["pipeline, bf16", "audio s/s", "of bf16 limit", "ms per clip", "forwards", "padding"]
    print(common.table([[k, f"{r['audio_s_per_s']:.0f}", f"{r['of_bf16_limit']:.1%}", f"{r['ms_per_clip']:.1f}",
                         r["forwards"], f"{r['padding_fraction']:.1%}"] for k, r in rows.items()], headers,
                       f"GPU extraction, {n} clips of 2-15 s ({audio_s:.0f} s), mean of 2 interleaved rounds"))
    for name, split in data["stages"].items():
        print(common.table([[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in split.items()],
                           ["stage", "seconds"], f"Where the main thread's time goes: {name}"))
    return data


if __name__ == "__main__":
    main()
