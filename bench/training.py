"""Training throughput and memory on a MOSEI-sized cache, against the model's own FLOP limit.

A cache shaped like CMU-MOSEI (23,000 utterances) is generated once into a temporary folder, with
random float16 features written through emofuse.cache (FeatureStore + ShardWriter, 64 MB shards),
in the widths of the paper's encoders:
  text   1024-d (RoBERTa-large) tokens: lognormal, median 27, mean ~30, clipped to 4-100 tokens;
  audio  512-d (wav2vec) frames at 50 per second of a lognormal duration with median 6.3 s and
         mean ~7.3 s (MOSEI's average utterance is 7.28 s, Zadeh et al. 2018), clipped to 1-30 s;
  video  256-d (FabNet) face frames at 10 per second of the same duration (the paper fed every
         frame, up to 300; 10 fps keeps the cache at ~11 GB).
Every configuration then runs in its own subprocess (so each peak RSS is its own) through the real
emofuse data path: CachedData(preload_gb=0) with lazy HDF5 reads (StoreFeatures), lengths from
the offsets, make_batches (length-bucketed, shuffled), collate (normalise, pad, masks), SSEFT
forward, L1 loss (MOSEI regression), backward, gradient clipping and an AdamW step: the loop of
emofuse.fuse.train.fit, timed in two parts: data (collate, which reads HDF5) and compute.

Reported per configuration: samples/s over the measured steps (after warm-up steps), the epoch
time over all 23,000 utterances extrapolated from them (said so: a whole epoch is not run), the
fraction of step time spent waiting for data, peak RSS (ru_maxrss) of the data path alone and of
the whole training process, and the FLOP limit: FLOPs of forward + backward of every measured
batch (torch's flop counter on a meta-device copy of the model: same shapes, no compute) / the
torch.matmul rate measured in the same subprocess, at its thread count (each subprocess probes
1 vs 2 threads just before it measures, see common.setup_threads). A short torch.profiler
summary of the top operators of one step says what limits each configuration.
The normaliser's statistics (one pass over the train split at the start of a run) are measured
on a sample and extrapolated, listed apart.
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "training"
DIMS = {"audio": 512, "text": 1024, "video": 256}
RATES = {"audio": 50.0, "video": 10.0}
CONFIGS = {
    # name: FusionConfig overrides (the rest are FusionConfig's defaults = the config's model defaults)
    "paper": {"preset": "paper"},
    # the same model with `train.step_frames: 1500`: a batch longer than 1,500 padded frames runs as
    # micro-batches whose gradients add up to the batch's (one 30 s clip at a time at the longest)
    "paper-micro": {"preset": "paper"},
    "fast": {"preset": "fast"},
    # the `fast` preset before 2026-11-26 (2 self + 2 cross layers, no pooling, attention dropout)
    "fast-deep": {"preset": "fast", "self_layers": {"audio": 2, "text": 0, "video": 2}, "cross_layers": 2,
                  "ffn": 1024, "attn_dropout": 0.1, "pool_stride": {"audio": 1, "text": 1, "video": 1}},
    # the model section of configs/demo.yaml: a small fast model, audio pooled 8x in time
    "demo-model": {"preset": "fast", "width": 64, "self_layers": {"audio": 1, "text": 0, "video": 1},
                   "cross_layers": 1, "heads": 4, "ffn": 128, "pool_stride": {"audio": 8, "text": 1, "video": 1}},
}
# per configuration (full run): seconds of measured steps (at least MIN_STEPS), warm-up steps (the
# first is the epoch's longest batch), batches whose FLOPs are counted
SECONDS = {"paper": 30.0, "paper-micro": 30.0, "fast": 35.0, "fast-deep": 25.0, "demo-model": 20.0}
MIN_STEPS = {"paper": 2, "paper-micro": 2, "fast": 3, "fast-deep": 3, "demo-model": 5}
WARMUP = {"paper": 1, "paper-micro": 1, "fast": 2, "fast-deep": 2, "demo-model": 2}
FLOP_BATCHES = {"paper": 1, "paper-micro": 1, "fast": 2, "fast-deep": 2, "demo-model": 3}
STEP_FRAMES = {"paper-micro": 1500}  # train.step_frames per configuration (0: the whole batch at once)


# ------------------------------------------------------------------------------------- the cache


def mosei_lengths(n: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(6.3), 0.55, n), 1.0, 30.0)
    tokens = np.clip(np.round(rng.lognormal(np.log(27), 0.45, n)), 4, 100).astype(int)
    return {"text": tokens, "audio": np.maximum(1, np.round(seconds * RATES["audio"]).astype(int)),
            "video": np.maximum(1, np.round(seconds * RATES["video"]).astype(int)), "seconds": seconds}


def build_cache(cache_dir: Path, n: int, seed: int = 0) -> dict:
    """Three feature stores + utterances.jsonl + protocol.json, as `emofuse extract` leaves them."""
    import numpy as np

    from emofuse.cache.store import FeatureStore
    from emofuse.corpora.base import Protocol, Utterance, write_utterances
    from emofuse.extract.encoders.base import fingerprint

    rng = np.random.default_rng(seed)
    lengths = mosei_lengths(n, seed)
    ids = [f"vid{i // 10:05d}_{i % 10}" for i in range(n)]
    cache_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for m, dim in DIMS.items():
        spec = {"backend": "bench-random", "modality": m, "dim": dim}
        store = FeatureStore.create(cache_dir / f"{m}-bench", m, spec, fingerprint(spec), dim=dim,
                                    fps=RATES.get(m))
        lens = lengths[m]
        pool = rng.standard_normal((int(lens.max()) + 8192, dim)).astype(np.float16)
        start = time.perf_counter()
        with store.writer("bench", 64 << 20) as w:
            for uid, t in zip(ids, lens):
                a = int(rng.integers(0, len(pool) - t))
                w.add(uid, pool[a : a + t])
        store.close()
        store = FeatureStore(store.path)
        info = store.info()
        store.close()
        stats[m] = {"frames_mean": float(lens.mean()), "frames_max": int(lens.max()), "bytes": info["bytes"],
                    "shards": info["shards"], "write_seconds": time.perf_counter() - start}
        common.log(f"[training]   {m}: {info['bytes'] / 1e9:.2f} GB, {info['shards']} shards, "
                   f"mean {lens.mean():.0f} frames")
    # MOSEI-like split proportions (16,326 / 1,871 / 4,659); the epoch below runs over all of them.
    split = rng.choice(["train", "dev", "test"], size=n, p=[0.715, 0.082, 0.203])
    labels = np.clip(rng.normal(0.7, 1.2, n), -3, 3).round(3)
    utts = [Utterance(id=i, speaker=i.split("_")[0], split=str(s), labels={"sentiment": float(y)})
            for i, s, y in zip(ids, split, labels)]
    write_utterances(utts, cache_dir / "utterances.jsonl")
    protocol = Protocol(name="mosei-like-bench", label="sentiment", task="regression")
    (cache_dir / "protocol.json").write_text(json.dumps(protocol.__dict__))
    stats["utterances"] = n
    stats["bytes"] = sum(stats[m]["bytes"] for m in DIMS)
    stats["audio_seconds_mean"] = float(lengths["seconds"].mean())
    return stats


ENCODERS = {m: {"backend": "bench-random", "modality": m} for m in DIMS}


# ------------------------------------------------------------------------------------- one configuration


def worker(args) -> dict:
    """Runs in its own process: open the cache lazily, train for a while, report."""
    import numpy as np
    import psutil
    import torch
    import torch.nn.functional as F

    from emofuse.extract.encoders.hf import precision
    from emofuse.fuse.data import CachedData, Normalizer, collate, make_batches, prefetched
    from emofuse.fuse.model import MODALITIES, SSEFT, FusionConfig
    from emofuse.fuse.train import adamw, train_step

    device = args.device
    if device == "cpu":  # `auto`: probed here, just before this configuration is measured
        out_threads = common.setup_threads(args.threads)
    proc = psutil.Process()
    overrides = CONFIGS[args.worker]
    out = {"config": args.worker, "overrides": overrides, "batch_size": args.batch_size, "device": device,
           "threads": torch.get_num_threads(), "thread_choice": out_threads if device == "cpu" else None}

    t0 = time.perf_counter()
    modalities = [m for m in MODALITIES if m in DIMS]
    data = CachedData(Path(args.cache), ENCODERS, modalities, preload_gb=0.0)
    assert not data.preloaded
    ids = [u.id for u in data.utterances]
    lengths = {i: data.length(i) for i in ids}
    targets = data.targets()
    out["open_seconds"] = time.perf_counter() - t0
    out["rss_after_open"] = proc.memory_info().rss

    # Normaliser: one pass over the train split at the start of a run; measured on a sample.
    rng = np.random.default_rng(0)
    train_ids = data.split_ids("train")
    sample = list(rng.choice(train_ids, size=min(len(train_ids), args.norm_sample), replace=False))
    t0 = time.perf_counter()
    normalizer = Normalizer.fit(data.features, sample)
    norm_s = time.perf_counter() - t0
    out["normalizer"] = {"sample": len(sample), "seconds": norm_s,
                         "train_pass_seconds_extrapolated": norm_s * len(train_ids) / len(sample)}

    # The data path alone (before any model exists): collate the epoch's longest batch and some
    # others from the lazy store; its peak RSS is what the cache costs in memory.
    probe_batches = make_batches(ids, lengths, args.batch_size, shuffle=True, rng=np.random.default_rng(2))
    longest = max(range(len(probe_batches)), key=lambda j: max(lengths[i] for i in probe_batches[j]))
    t0 = time.perf_counter()
    for j in [longest] + list(range(min(20, len(probe_batches)))):
        collate(probe_batches[j], data.features, data.frame_shapes(), normalizer, 0)
    out["data_only"] = {"batches": 1 + min(20, len(probe_batches)), "seconds": time.perf_counter() - t0,
                        "rss_peak": common.peak_rss_bytes()}
    del probe_batches

    torch.manual_seed(0)
    cfg = FusionConfig(modalities=modalities, input_dims=data.dims(), num_layers_in=data.layers(),
                       num_outputs=1, **overrides)
    model = SSEFT(cfg).to(device)
    out["parameters"] = model.count_parameters()
    opt = adamw(model, lr=3e-4, weight_decay=0.01)
    batches = make_batches(ids, lengths, args.batch_size, shuffle=True, rng=np.random.default_rng(1))
    shapes = data.frame_shapes()

    def get_batch(batch):
        feats, masks, present = collate(batch, data.features, shapes, normalizer, 0)
        y = torch.tensor([targets[i] for i in batch], dtype=torch.float32)
        if device != "cpu":
            feats = {m: v.to(device, non_blocking=True) for m, v in feats.items()}
            masks = {m: v.to(device, non_blocking=True) for m, v in masks.items()}
            present, y = present.to(device), y.to(device)
        return feats, masks, present, y

    def lower_precision():
        # bf16 autocast as the extraction's forwards run it: on a GPU without cuDNN's attention,
        # which re-plans for every new sequence length (bench/results/gpu_sdpa_check.txt)
        return precision(torch.bfloat16, device) if args.bf16 else contextlib.nullcontext()

    step_frames = STEP_FRAMES.get(args.worker, 0)
    out["step_frames"] = step_frames

    def step(feats, masks, present, y) -> float:
        opt.zero_grad(set_to_none=True)
        with lower_precision():  # the training loop's own step: L1 loss, micro-batches under step_frames
            loss = train_step(model, feats, masks, present, y, "regression", step_frames=step_frames)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    model.train()
    # Warm-up, starting with the batch of the longest padded sequences: the epoch's memory peak
    # (activations grow with the padded length), so that the peak RSS below is the epoch's.
    longest = max(range(len(batches)), key=lambda j: max(lengths[i] for i in batches[j]))
    batches.insert(0, batches.pop(longest))
    k = 0
    for _ in range(max(1, args.warmup)):
        step(*get_batch(batches[k]))
        k += 1
    sync()
    data_s = compute_s = 0.0
    samples = 0
    measured, shapes_seen = [], []
    start = time.perf_counter()
    stream = prefetched(batches[k:], get_batch)  # as emofuse's training loop reads them
    while k < len(batches):
        t0 = time.perf_counter()
        b = next(stream)
        shapes_seen.append({"feats": {m: tuple(v.shape) for m, v in b[0].items()},
                            "masks": {m: tuple(v.shape) for m, v in b[1].items()}, "present": tuple(b[2].shape)})
        sync()
        t1 = time.perf_counter()
        loss = step(*b)  # a float: the step has finished
        sync()
        t2 = time.perf_counter()
        data_s += t1 - t0
        compute_s += t2 - t1
        samples += len(batches[k])
        measured.append(k)
        k += 1
        if time.perf_counter() - start >= args.seconds and len(measured) >= args.min_steps:
            break
    wall = time.perf_counter() - start
    stream.close()
    out.update(steps=len(measured), samples=samples, seconds=wall, data_seconds=data_s, compute_seconds=compute_s,
               samples_per_s=samples / wall, data_wait_fraction=data_s / (data_s + compute_s),
               epoch_utterances=len(ids), epoch_seconds_extrapolated=len(ids) * wall / samples,
               steps_per_epoch=len(batches), final_loss=loss)
    out["rss_peak"] = common.peak_rss_bytes()  # the training phase only (warm-up included)
    out["rss_end"] = proc.memory_info().rss
    if device != "cpu":
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()

    # FLOPs of forward + backward of every measured batch (outside the clock). They depend on the
    # padded shapes only, so they are counted on a copy of the model on the meta device (no compute);
    # if that fails, on the real model for a few of the batches.
    from torch.utils.flop_counter import FlopCounterMode

    common.count_cpu_attention()  # the real-model fallback below runs attention on the CPU

    def count(mdl, feats, masks, present, y):
        with FlopCounterMode(display=False) as fc:
            with lower_precision():
                loss = F.l1_loss(mdl(feats, masks, present).squeeze(-1).float(), y)
            loss.backward()
        return fc.get_total_flops()

    # At most 40 batches, evenly spaced: on a GPU a run measures hundreds, and counting each one
    # took longer than the steps themselves.
    sampled = list(zip(measured, shapes_seen))[:: max(1, -(-len(measured) // 40))]
    flops = n_counted = 0
    try:
        meta = copy.deepcopy(model).to("meta")
        for k, shp in sampled:
            z = lambda shape, dtype=torch.float32: torch.ones(shape, dtype=dtype, device="meta")  # noqa: E731
            flops += count(meta, {m: z(v) for m, v in shp["feats"].items()},
                           {m: z(v, torch.bool) for m, v in shp["masks"].items()},
                           z(shp["present"], torch.bool), z((len(batches[k]),)))
            n_counted += len(batches[k])
        out["flops_counted_on"] = f"{len(sampled)} of {len(measured)} measured batches (meta tensors)"
    except Exception as e:  # noqa: BLE001 - any meta-device gap: count the real thing instead
        flops = n_counted = 0
        counted = measured[:: max(1, len(measured) // args.flop_batches)][: args.flop_batches]
        for j in counted:
            flops += count(model, *get_batch(batches[j]))
            n_counted += len(batches[j])
        opt.zero_grad(set_to_none=True)
        out["flops_counted_on"] = f"{len(counted)} measured batches (meta device failed: {type(e).__name__})"
    out["flops_per_sample"] = flops / n_counted
    # the matmul rate at this process's own thread count, right after its steps
    dtype = "bfloat16" if args.bf16 else "float32"
    out["matmul_flops_per_s"] = common.matmul_rate(dtype, device, seconds=0.5 if args.quick_worker else 2.0)["flops_per_s"]

    if args.profile and device == "cpu":  # one real step of a measured batch under torch.profiler
        with torch.profiler.profile() as prof:
            step(*get_batch(batches[measured[0]]))
        ev = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                    key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ev) or 1
        out["profile_top"] = [{"op": e.key, "self_fraction": e.self_cpu_time_total / total, "calls": e.count}
                              for e in ev[:8]]
    out["mean_frames_per_sample"] = {m: float(np.mean([data.stores[m].length(i) for b in measured for i in batches[b]]))
                                     for m in modalities}
    return out


def run_worker(name: str, args, cache: Path, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--cache", str(cache),
           "--threads", str(threads), "--batch-size", str(args.batch_size), "--device", args.device,
           "--seconds", str(3.0 if args.quick else SECONDS[name] * args.time_scale),
           "--min-steps", "1" if args.quick else str(MIN_STEPS[name]),
           "--warmup", "1" if args.quick else str(WARMUP[name]),
           "--norm-sample", "100" if args.quick else "500",
           "--flop-batches", "1" if args.quick else str(FLOP_BATCHES[name])]
    if args.bf16:
        cmd.append("--bf16")
    if args.quick:
        cmd.append("--quick-worker")
    if not args.quick:
        cmd.append("--profile")
    common.log(f"[training] {name}: subprocess")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        common.log(res.stderr[-4000:])
        return {"config": name, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--utterances", type=int, default=23000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    p.add_argument("--cache", default=None, help="reuse (or build and keep) the generated cache in this folder")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply each configuration's measuring time")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in the step (GPU runs)")
    # internal: one configuration in a subprocess
    p.add_argument("--worker", default=None, help=argparse_hidden())
    p.add_argument("--seconds", type=float, default=30.0, help=argparse_hidden())
    p.add_argument("--min-steps", type=int, default=3, help=argparse_hidden())
    p.add_argument("--warmup", type=int, default=2, help=argparse_hidden())
    p.add_argument("--norm-sample", type=int, default=500, help=argparse_hidden())
    p.add_argument("--profile", action="store_true", help=argparse_hidden())
    p.add_argument("--flop-batches", type=int, default=2, help=argparse_hidden())
    p.add_argument("--quick-worker", action="store_true", help=argparse_hidden())
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return {}

    import torch

    threads = common.setup_threads(args.threads) if args.device == "cpu" else {"threads": torch.get_num_threads()}
    common.log(f"[training] torch threads: {threads}")
    n = 300 if args.quick else args.utterances
    if args.quick:
        args.batch_size = min(args.batch_size, 8)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.quick and args.configs == p.get_default("configs"):
        names = ["fast", "demo-model"]
    rates_before = {d: common.matmul_rate(d, args.device, seconds=1.0 if args.quick else 3.0) for d in ("float32", "bfloat16")}
    rows = []
    with common.temp_dir(args.tmp, NAME, keep=bool(args.cache)) as tmp:
        cache = Path(args.cache) if args.cache else tmp / "mosei-like"
        if (cache / "protocol.json").exists():
            common.log(f"[training] reusing the cache in {cache}")
            cache_stats = json.loads((cache / "bench-stats.json").read_text())
        else:
            common.log(f"[training] generating a MOSEI-sized cache: {n} utterances in {cache}")
            t0 = time.perf_counter()
            cache_stats = build_cache(cache, n)
            cache_stats["build_seconds"] = time.perf_counter() - t0
            (cache / "bench-stats.json").write_text(json.dumps(cache_stats))
        files = [f for m in DIMS for f in (cache / f"{m}-bench").glob("shard-*.h5")]
        for name in names:
            resident = common.cached_fraction(files)
            r = run_worker(name, args, cache, args.threads if args.device == "cpu" else threads["threads"])
            r["store_resident_before"] = resident
            rows.append(r)
            if "error" not in r:
                common.log(f"[training]   {name}: {r['samples_per_s']:.1f} samples/s, data wait "
                           f"{100 * r['data_wait_fraction']:.1f}%, peak RSS {r['rss_peak'] / 2**30:.2f} GiB")
    rates_after = {d: common.matmul_rate(d, args.device, seconds=1.0 if args.quick else 3.0) for d in ("float32", "bfloat16")}
    rates = {d: (rates_before[d]["flops_per_s"] + rates_after[d]["flops_per_s"]) / 2 for d in rates_before}
    dtype = "bfloat16" if args.bf16 else "float32"
    for r in rows:
        if "error" in r:
            continue
        r["flop_limit_samples_per_s"] = r.get("matmul_flops_per_s", rates[dtype]) / r["flops_per_sample"]
        r["fraction_of_limit"] = r["samples_per_s"] / r["flop_limit_samples_per_s"]
        r["flop_limit_epoch_seconds"] = r["epoch_utterances"] / r["flop_limit_samples_per_s"]
    targets = {"rss_limit_bytes": 2 * 2**30, "fast_epoch_limit_seconds": 120.0}
    for r in rows:
        if "error" in r:
            continue
        r["met_rss"] = r["rss_peak"] < targets["rss_limit_bytes"]
        r["met_rss_data_only"] = r["data_only"]["rss_peak"] < targets["rss_limit_bytes"]
        if r["overrides"].get("preset") == "fast":
            r["met_epoch"] = r["epoch_seconds_extrapolated"] < targets["fast_epoch_limit_seconds"]

    data = {"quick": args.quick, "device": args.device, "threads": threads, "dtype": dtype,
            "matmul_before": rates_before, "matmul_after": rates_after, "matmul_used_flops_per_s": rates,
            "cache": cache_stats, "targets": targets, "rows": rows}
    path = common.write_result(NAME + ("_" + args.device if args.device != "cpu" else ""), data, args.out)

    headers = ["config", "threads", "params", "steps", "samples/s", "epoch (extrap.)", "FLOP limit epoch", "of limit",
               "data wait", "RSS data path", "RSS training", "RSS<2GB", "epoch<2min"]
    t = []
    for r in rows:
        if "error" in r:
            t.append([r["config"], None, "ERROR: " + r["error"]] + [None] * (len(headers) - 3))
            continue
        t.append([r["config"], r["threads"], f"{r['parameters'] / 1e6:.1f}M", r["steps"], r["samples_per_s"],
                  _dur(r["epoch_seconds_extrapolated"]), _dur(r["flop_limit_epoch_seconds"]),
                  f"{100 * r['fraction_of_limit']:.0f}%", f"{100 * r['data_wait_fraction']:.1f}%",
                  f"{r['data_only']['rss_peak'] / 2**30:.2f} GiB", f"{r['rss_peak'] / 2**30:.2f} GiB",
                  ("met" if r["met_rss"] else "data path only" if r["met_rss_data_only"] else "MISSED"),
                  ("met" if r["met_epoch"] else "MISSED") if "met_epoch" in r else "-"])
    cs = cache_stats
    title = (f"Training ({args.device}, {dtype}, batch {args.batch_size}; "
             f"MOSEI-sized cache: {cs['utterances']:,} utterances, {cs['bytes'] / 1e9:.1f} GB, lazy HDF5 reads; "
             f"FLOP limit: each process's own matmul rate){' [QUICK: not a measurement]' if args.quick else ''}")
    print(common.table(t, headers, title))
    print("epoch times are extrapolated from the measured steps (samples/s), not a full epoch run; "
          "normaliser pass (once per run, extrapolated): "
          + ", ".join(f"{r['config']} {r['normalizer']['train_pass_seconds_extrapolated']:.0f} s" for r in rows if "error" not in r))
    for r in rows:
        if r.get("profile_top"):
            top = ", ".join(f"{e['op'].replace('aten::', '')} {100 * e['self_fraction']:.0f}%" for e in r["profile_top"][:5])
            print(f"profile {r['config']}: {top}")
    print("RSS data path: peak while collating the epoch's longest batch and 20 others from the lazy store, before "
          "any model exists; RSS training: peak of the training process (the longest batch is a warm-up step)")
    print(f"wrote {path}")
    return data


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def _dur(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


if __name__ == "__main__":
    main()
