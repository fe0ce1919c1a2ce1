"""Where the time of GPU extraction goes: the hf audio path at wav2vec2-base size (random weights),
bf16 autocast, end to end (decode + prepare + encode + write) through the real pipeline.

On an H200 (2026-11-26) this pipeline ran 200 clips of 2-15 s in 3.6 s, 1.1% of the bf16 FLOP
limit: host-bound. This run splits that time, for bench/gpu_check.sh:

  1. stages of the pipeline: the main thread's time in the model's forward call (host: Python and
     kernel launches), waiting for the GPU to finish (a synchronize after the call), the rest of
     encode (stacking, the copy to the host, unpadding), the store's writer, and waiting for the
     preparing threads; the threads' own time decoding and preparing;
  2. one forward of three 8 s clips: host time of the call against GPU time, the feature encoder's
     share, and the number of kernel launches (torch.profiler);
  3. new input lengths against lengths seen before (plan and heuristic caches of cuDNN / cuBLAS);
  4. the same pipeline with the feature encoder changed (no tiles; transformers' own convs on the
     layer-norm variant), more preparing threads and a 4x larger batch budget.

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


def run_pipeline(encoder, clips, out: Path, workers: int = 2, budget: int = BUDGET) -> float:
    from emofuse.corpora.base import Utterance
    from emofuse.extract.pipeline import extract_modality

    utts = [Utterance(id=p.stem, audio=str(p)) for p, _ in clips]
    encoder.full_spec()
    start = time.perf_counter()
    result = extract_modality(utts, encoder, out, budget=budget, workers=workers, progress=False, log=lambda *a: None)
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


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--clips", type=int, default=200)
    args = p.parse_args(argv)
    import torch

    common.quiet_transformers()
    dev = args.device
    n = 12 if args.quick else args.clips
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
        rows = {}

        def pipeline_row(name, encoder, **kw):
            run_pipeline(encoder, clips[: max(4, n // 8)], tmp / f"warm-{len(rows)}", **kw)  # warm-up (kernels, plans)
            seconds = run_pipeline(encoder, clips, tmp / f"out-{len(rows)}", **kw)
            rows[name] = {"seconds": seconds, "audio_s_per_s": audio_s / seconds,
                          "of_bf16_limit": audio_s / seconds * gflop_per_s_audio * 1e9 / rate,
                          "ms_per_clip": seconds / n * 1e3}
            common.log(f"[gpu-profile] {name}: {audio_s / seconds:.0f} audio s/s ({seconds:.2f} s)")

        enc = build(group, dev)
        pipeline_row("pipeline bf16 (as shipped)", enc)
        stages = StageTimes(enc, dev)
        with stages.timing_writes():
            total = run_pipeline(enc, clips, tmp / "out-stages")
        data["stages"] = stages.split(total)
        common.log(f"[gpu-profile] stages: {data['stages']}")

        import numpy as np

        x8 = [np.random.default_rng(i).standard_normal(16000 * 8).astype(np.float32) for i in range(3)]
        plain = build(group, dev)
        data["forward_3x8s"] = one_forward(plain, x8, dev, repeats=3 if args.quick else 11)
        data["profile_3x8s"] = launches(plain, x8, dev)
        data["new_lengths"] = new_lengths(plain, dev, n=3 if args.quick else 8)
        common.log(f"[gpu-profile] one forward: {data['forward_3x8s']}; new lengths: {data['new_lengths']}; "
                   f"launches per forward {data['profile_3x8s']['kernel_launches_per_forward']:.0f}")
        print(data["profile_3x8s"]["table"])

        notiles = build(group, dev)
        notiles.model.feature_extractor.tile_frames = 1 << 30
        pipeline_row("no tiles in the feature encoder", notiles)
        pipeline_row("8 preparing threads", build(group, dev), workers=8)
        pipeline_row("4x batch budget (240 s)", build(group, dev), budget=4 * BUDGET)
        pipeline_row("layer-norm variant, our feature encoder", build(layer, dev))
        theirs = build(layer, dev)
        theirs.model.feature_extractor = theirs.model.feature_extractor.hf  # transformers' own convs
        theirs_fe = one_forward(theirs, x8, dev, repeats=3 if args.quick else 11)
        ours_fe = one_forward(build(layer, dev), x8, dev, repeats=3 if args.quick else 11)
        data["layer_norm_forward_3x8s"] = {"ours": ours_fe, "transformers": theirs_fe}
        common.log(f"[gpu-profile] layer-norm variant, one forward: ours {ours_fe}; transformers' convs {theirs_fe}")
        pipeline_row("layer-norm variant, transformers' feature encoder", theirs)
        data["rows"] = rows
    common.write_result(NAME, data, args.out)
    headers = ["pipeline, bf16", "audio s/s", "of bf16 limit", "ms per clip"]
    print(common.table([[k, f"{r['audio_s_per_s']:.0f}", f"{r['of_bf16_limit']:.1%}", f"{r['ms_per_clip']:.1f}"]
                        for k, r in rows.items()], headers, f"GPU extraction, {n} clips of 2-15 s ({audio_s:.0f} s)"))
    s = data["stages"]
    print(common.table([[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in s.items()], ["stage", "seconds"],
                       "Where the main thread's time goes (bf16 pipeline, as shipped)"))
    return data


if __name__ == "__main__":
    main()
