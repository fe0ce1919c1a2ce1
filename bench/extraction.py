"""Extraction throughput: seconds of media encoded per second, end to end, against the FLOP limit.

End to end = decode + prepare + encode + write, through emofuse.extract.pipeline.extract_modality
into a real feature store (HDF5 shards). Measured side by side in one run:

  (a) the `hf` audio path at wav2vec2-base size (random weights: the FLOPs are those of the real
      model) over 200 generated 16 kHz WAV clips of 2-15 s with bf16 autocast, and over every 4th
      of them in fp32;
  (b) the offline default encoders on the generated demo corpus: opensmile (eGeMAPS LLDs),
      minilm (all-MiniLM-L6-v2 token states) and dlib (landmarks + face descriptor) on a few clips;
  next to
  - a naive loop that loads and encodes one file at a time in fp32, without the pipeline
    (plain soundfile + transformers for wav2vec2; prepare + encode one by one for the others);
  - the encoder's FLOP limit on this machine: FLOPs of the forwards (torch's flop counter) divided
    by the torch.matmul rate on large fp32 / bf16 matrices. The wav2vec2 rows run interleaved, in
    two rounds over halves of the clips (the second in reverse order), each part right after a
    matmul probe of its dtype, because this VM's speed drifts within minutes (bench_wav2vec2);
    the offline rows use the rate measured before and after the run.

Printed: media seconds per second, fraction of the FLOP limit, ratio to the naive loop, and the
padding fraction of the encoder batches (padded positions / all positions in the forwards).
Model loading and checkpoint hashing happen before the clock starts, for every row alike.
What each CPU speed-up of the bf16 path is worth is bench/ablation.py's: rows of one process share
oneDNN's kernel cache, which biases A/B rows by their position (see there).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository on sys.path)

NAME = "extraction"
ROUNDS = 2  # see bench_wav2vec2


def instrument(encoder) -> dict:
    """Record the shape of every padded forward of an hf-style encoder (bench-only wrapper)."""
    stats = {"forwards": 0, "items": 0, "real": 0, "padded": 0}
    inner = encoder._forward_padded

    def wrapped(inputs, n=None):
        lengths = [len(x) for x in inputs]
        stats["forwards"] += 1
        stats["items"] += len(lengths)
        stats["real"] += sum(lengths)
        stats["padded"] += (n or max(lengths)) * len(lengths)  # n: the padded length, when the encoder sets it
        return inner(inputs, n)

    encoder._forward_padded = wrapped
    return stats


def padding_fraction(stats: dict) -> float | None:
    return 1 - stats["real"] / stats["padded"] if stats.get("padded") else None


def run_pipeline(utts, encoder, cache_dir: Path, budget: int, workers: int = 2) -> tuple[float, object]:
    from emofuse.extract.pipeline import extract_modality

    encoder.full_spec()  # hash the checkpoint now, outside the clock (it is cached on the encoder)
    start = time.perf_counter()
    result = extract_modality(utts, encoder, cache_dir, budget=budget, workers=workers, progress=False,
                              log=lambda *a: None)
    seconds = time.perf_counter() - start
    if result.failed:
        raise RuntimeError(f"{result.failed} utterances failed: {result.failure_reasons}")
    return seconds, result


# ------------------------------------------------------------------------------------- wav2vec2


def wav2vec2_flops_model(folder: Path, device: str, probe_seconds=(4.0, 12.0)) -> tuple[float, float]:
    """FLOPs of one forward as a * seconds + b * seconds^2 (the attention part is quadratic),
    fitted exactly through two counted forwards."""
    import numpy as np
    import torch
    from transformers import Wav2Vec2Model

    model = Wav2Vec2Model.from_pretrained(folder).eval().to(device)
    counts = []
    for s in probe_seconds:
        x = torch.randn(1, int(s * 16000), device=device)
        with torch.no_grad():  # not inference_mode: weight-norm parametrisations fail under the counter there
            counts.append(common.count_flops(lambda: model(x)))
    (s1, s2), (f1, f2) = probe_seconds, counts
    a, b = np.linalg.solve([[s1, s1 * s1], [s2, s2 * s2]], [f1, f2])
    del model
    return float(a), float(b)


class NaiveWav2vec2:
    """One file at a time, fp32, no pipeline: read, normalise, forward, save (the model is loaded
    before the clock, like the pipeline rows' encoders)."""

    def __init__(self, folder: Path, device: str):
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        self.model = Wav2Vec2Model.from_pretrained(folder).eval().to(device)
        self.fe = Wav2Vec2FeatureExtractor.from_pretrained(folder)
        self.device = device

    def __call__(self, clips, out: Path) -> float:
        import numpy as np
        import soundfile as sf
        import torch

        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        for i, (path, _) in enumerate(clips):
            wav, sr = sf.read(path, dtype="float32")
            x = self.fe(wav, sampling_rate=sr, return_tensors="pt")["input_values"].to(self.device)
            with torch.inference_mode():
                h = self.model(x).last_hidden_state[0]
            np.save(out / f"{i}.npy", h.float().cpu().numpy().astype(np.float16))
        return time.perf_counter() - start


def bench_wav2vec2(args, tmp: Path) -> tuple[list[dict], dict]:
    """Every row runs in ROUNDS rounds over disjoint halves of the clips, in reverse order in the
    second round, and each part of a row is preceded by a matmul probe of its dtype. This VM's bf16
    matmul rate moves 2-3x within minutes (other tenants share the AMX units): rows timed one after
    the other minutes apart compared machine states, not code. Interleaved, a drift over the run
    falls on every row alike (to first order), and each row's FLOP limit comes from the rate
    measured next to it (time-weighted over its parts)."""
    from emofuse.corpora.base import Utterance
    from emofuse.extract.encoders.base import build_encoder

    n, lo, hi = (6, 2.0, 4.0) if args.quick else (args.clips, 2.0, 15.0)
    common.log(f"[extraction] writing {n} WAV clips of {lo:g}-{hi:g} s")
    clips = common.write_clips(tmp / "clips", n, lo, hi)
    # The fp32 rows (the naive loop and the fp32 pipeline) run on every k-th clip: durations are
    # drawn independently, so the subset has the corpus's length distribution, and the rates
    # (seconds of audio per second) compare; the bf16 rows run on all clips.
    every = 1 if args.quick else args.reference_every
    halves = [clips[r::ROUNDS] for r in range(ROUNDS)]
    common.log(f"[extraction] {sum(d for _, d in clips):.0f} s of audio ({sum(d for _, d in clips[::every]):.0f} s in "
               f"the fp32 rows: every {every} clip(s)), in {ROUNDS} interleaved rounds; building random-weight wav2vec2-base")
    folder = common.make_wav2vec2(tmp / "wav2vec2-base")
    a, b = wav2vec2_flops_model(folder, args.device, (1.0, 3.0) if args.quick else (4.0, 12.0))
    device = args.device
    budget = 16000 * 60  # the config default: 60 s of padded audio per batch
    flops = lambda subset: sum(a * d + b * d * d for _, d in subset)  # noqa: E731

    def pipeline(model_folder, dtype):
        enc = build_encoder("audio", {"backend": "hf", "path": str(model_folder), "dtype": dtype, "device": device})
        stats = instrument(enc)

        def run(subset, out):
            utts = [Utterance(id=p.stem, audio=str(p)) for p, _ in subset]
            return run_pipeline(utts, enc, out, budget)[0]
        return run, stats

    def pipeline_processes(model_folder, dtype, n_workers):
        """`emofuse extract --workers N`: a dask LocalCluster of N processes with one torch thread
        each, writing into one store. Each worker builds its model before the clock, like the
        other rows; chunks of a quarter of the clips per worker, so both stay busy.

        The cluster is up only for this row's runs: idle, its scheduler (a thread of this process)
        and two worker processes slowed the one-process rows measured beside it by ~15% on 2 cores
        (57.5 audio s/s without, 48-50 with; bench/README.md, session 13)."""
        from dask.distributed import Client, LocalCluster

        from emofuse.extract.distributed import describe_encoder, extract_modality_distributed

        spec = {"backend": "hf", "path": str(model_folder), "dtype": dtype, "device": device}

        def run(subset, out):
            utts = [Utterance(id=p.stem, audio=str(p)) for p, _ in subset]
            with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                client.run(describe_encoder, "audio", spec, 1)  # each worker builds its model, outside the clock
                start = time.perf_counter()
                result = extract_modality_distributed(
                    client, utts, "audio", spec, out, budget=budget, chunk_size=-(-len(utts) // (4 * n_workers)),
                    torch_threads=1, progress=False, log=lambda *a: None)
                seconds = time.perf_counter() - start
            if result.failed:
                raise RuntimeError(f"{result.failed} utterances failed: {result.failure_reasons}")
            return seconds
        return run, None  # batches are formed in the workers: padding not counted

    # (name, dtype, every k-th clip, (run(subset, out) -> seconds, padding stats or None))
    common.log("[extraction] loading every row's model (outside the clock)")
    rows_spec = [("naive loop", "float32", every, (NaiveWav2vec2(folder, device), None)),
                 ("pipeline", "float32", every, pipeline(folder, "float32")),
                 ("pipeline", "bfloat16", 1, pipeline(folder, "bfloat16"))]
    if device == "cpu":
        rows_spec.append(("pipeline, 2 processes x 1 thread", "bfloat16", 1, pipeline_processes(folder, "bfloat16", 2)))
    if not args.quick and not args.no_layernorm:
        # The same size with a layer-norm feature encoder (wav2vec2-large-lv60 style).
        ln_folder = common.make_wav2vec2(tmp / "wav2vec2-base-ln", feat_extract_norm="layer")
        rows_spec.append(("pipeline, layer-norm variant", "bfloat16", 1, pipeline(ln_folder, "bfloat16")))

    totals = [{"seconds": 0.0, "clips": [], "rate_x_seconds": 0.0, "probes": []} for _ in rows_spec]
    for r, half in enumerate(halves):
        order = list(enumerate(rows_spec))
        for i, (name, dtype, k, (run, _)) in order if r % 2 == 0 else order[::-1]:
            subset = half[::k]
            rate = common.matmul_rate(dtype, device, seconds=0.3 if args.quick else 1.0)["flops_per_s"]
            seconds = run(subset, tmp / f"out-{i}-{r}")
            t = totals[i]
            t["seconds"] += seconds
            t["clips"] += subset
            t["rate_x_seconds"] += rate * seconds
            t["probes"].append(rate)
            common.log(f"[extraction]   round {r + 1}: {name} {dtype}: {sum(d for _, d in subset) / seconds:.2f} s of "
                       f"audio per s ({seconds:.1f} s; matmul {rate / 1e9:.0f} GFLOP/s just before)")

    rows = []
    for (name, dtype, _, (_, stats)), t in zip(rows_spec, totals):
        audio_s = sum(d for _, d in t["clips"])
        flops_per_audio_s = flops(t["clips"]) / audio_s
        rate = audio_s / t["seconds"]
        matmul = t["rate_x_seconds"] / t["seconds"]
        limit = matmul / flops_per_audio_s
        rows.append({"encoder": "wav2vec2-base (hf)", "path": name, "dtype": dtype, "clips": len(t["clips"]),
                     "media_s": audio_s, "seconds": t["seconds"], "media_s_per_s": rate,
                     "flops_per_media_s": flops_per_audio_s, "matmul_flops_per_s": matmul,
                     "matmul_probes": t["probes"], "flop_limit_media_s_per_s": limit, "fraction_of_limit": rate / limit,
                     "padding_fraction": padding_fraction(stats) if stats else (0.0 if name == "naive loop" else None),
                     "forwards": stats["forwards"] if stats else (len(t["clips"]) if name == "naive loop" else None)})
    naive = rows[0]["media_s_per_s"]
    for r in rows:
        r["ratio_to_naive"] = r["media_s_per_s"] / naive
    audio_s = sum(d for _, d in clips)
    info = {"clips": len(clips), "reference_every": every, "rounds": ROUNDS, "clip_seconds": [lo, hi],
            "audio_seconds": audio_s, "gflop_per_audio_second": flops(clips) / audio_s / 1e9,
            "flops_fit": {"a_per_s": a, "b_per_s2": b}, "batch_budget_samples": budget}
    return rows, info


# ------------------------------------------------------------------------------------- offline defaults


def bench_offline(args, tmp: Path) -> tuple[list[dict], dict]:
    import numpy as np
    import soundfile as sf
    import torch

    from emofuse.corpora import demo
    from emofuse.extract.encoders.base import build_encoder

    common.log("[extraction] generating the small demo corpus")
    root = demo.generate(tmp / "demo", size="small", progress=False)
    utts = demo.load(root).utterances
    if args.quick:
        utts = utts[:8]
    duration = {u.id: sf.info(u.audio).duration for u in utts}
    n_video = 3 if args.quick else args.face_clips
    specs = [
        ("audio", {"backend": "opensmile", "feature_set": "eGeMAPSv02"}, utts, 1 << 30),
        ("text", {"backend": "minilm", "device": args.device}, utts, 8192),
        ("video", {"backend": "dlib", "fps": 5}, utts[:n_video], 256),
    ]
    rows = []
    for modality, spec, subset, budget in specs:
        media_s = sum(duration[u.id] for u in subset)
        enc = build_encoder(modality, spec)
        enc.full_spec()
        # naive: one file at a time, prepare then encode, then save; no threads, no batching
        out = tmp / f"naive-{spec['backend']}"
        out.mkdir()
        start = time.perf_counter()
        for u in subset:
            x = enc.encode([enc.prepare(u)])[0]
            np.save(out / f"{u.id}.npy", x.astype(np.float16))
        naive_s = time.perf_counter() - start
        stats = instrument(enc) if hasattr(enc, "_forward_padded") else None
        seconds, _ = run_pipeline(subset, enc, tmp / f"cache-{spec['backend']}", budget)
        row = {"encoder": spec["backend"], "modality": modality, "path": "pipeline", "dtype": "float32",
               "clips": len(subset), "media_s": media_s, "seconds": seconds, "media_s_per_s": media_s / seconds,
               "naive_seconds": naive_s, "naive_media_s_per_s": media_s / naive_s, "ratio_to_naive": naive_s / seconds,
               "padding_fraction": padding_fraction(stats) if stats else None,
               "flop_limit_media_s_per_s": None, "fraction_of_limit": None}
        if spec["backend"] == "minilm":
            model = enc.model
            flops = 0
            for u in subset:
                ids = torch.tensor([enc.prefix + enc.prepare(u).tolist() + enc.suffix])
                with torch.no_grad():
                    flops += common.count_flops(lambda: model(input_ids=ids))
            row["gflop_per_utterance"] = flops / len(subset) / 1e9
            row["flops"] = flops  # its FLOP limit is set in main(), from the matmul rates around the run
        rows.append(row)
        common.log(f"[extraction]   {spec['backend']}: {row['media_s_per_s']:.1f} media s/s, "
                   f"{row['ratio_to_naive']:.2f}x the naive loop")
        del enc
    return rows, {"demo_utterances": len(utts), "face_clips": n_video}


# ------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--clips", type=int, default=200, help="number of generated WAV clips of 2-15 s (full run)")
    p.add_argument("--reference-every", type=int, default=4,
                   help="the fp32 rows (naive loop, fp32 pipeline) take every k-th clip (keeps `make bench` under 20 min)")
    p.add_argument("--face-clips", type=int, default=8, help="demo clips for the dlib encoder (full run)")
    p.add_argument("--no-layernorm", action="store_true", help="skip the layer-norm wav2vec2 variant")
    p.add_argument("--skip-offline", action="store_true", help="only the wav2vec2 path (e.g. on a GPU)")
    args = p.parse_args(argv)
    import torch

    dev = args.device
    threads = common.setup_threads(args.threads) if dev == "cpu" else {"threads": torch.get_num_threads()}
    common.log(f"[extraction] torch threads: {threads}")
    rates_before = {d: common.matmul_rate(d, dev, seconds=1.0 if args.quick else 3.0) for d in ("float32", "bfloat16")}
    common.log(f"[extraction] matmul: " + ", ".join(f"{d} {r['flops_per_s'] / 1e9:.0f} GFLOP/s" for d, r in rates_before.items()))
    with common.temp_dir(args.tmp, NAME) as tmp:
        w_rows, w_info = bench_wav2vec2(args, tmp)  # each row with its own limit (probes next to it)
        o_rows, o_info = ([], {}) if args.skip_offline else bench_offline(args, tmp)
    rates_after = {d: common.matmul_rate(d, dev, seconds=1.0 if args.quick else 3.0) for d in ("float32", "bfloat16")}
    # The offline rows' limit uses the mean of the rates measured before and after the run.
    rates = {d: {"dtype": d, "flops_per_s": (rates_before[d]["flops_per_s"] + rates_after[d]["flops_per_s"]) / 2}
             for d in rates_before}
    for r in o_rows:
        if r.get("flops"):
            r["flop_limit_media_s_per_s"] = rates["float32"]["flops_per_s"] / (r["flops"] / r["media_s"])
            r["fraction_of_limit"] = r["media_s_per_s"] / r["flop_limit_media_s_per_s"]

    data = {"quick": args.quick, "device": dev, "threads": threads, "matmul_before": rates_before, "matmul_after": rates_after,
            "matmul_used": rates, "wav2vec2": w_info, "offline": o_info, "rows": w_rows + o_rows}
    bf16 = next((r for r in w_rows if r["path"] == "pipeline" and r["dtype"] == "bfloat16"), None)
    if bf16:
        data["targets"] = {
            "pipeline_bf16_fraction_of_bf16_limit": bf16["fraction_of_limit"], "target_fraction": 0.70,
            "met_fraction": bf16["fraction_of_limit"] >= 0.70,
            "pipeline_bf16_ratio_to_naive": bf16["ratio_to_naive"], "target_ratio": 3.0,
            "met_ratio": bf16["ratio_to_naive"] >= 3.0,
            "padding_fraction": bf16["padding_fraction"], "target_padding": 0.05,
            "met_padding": (bf16["padding_fraction"] or 0) < 0.05}
        procs = next((r for r in w_rows if r["path"].startswith("pipeline, 2 processes")), None)
        if procs:
            data["targets"].update({
                "processes_bf16_fraction_of_bf16_limit": procs["fraction_of_limit"],
                "processes_bf16_ratio_to_naive": procs["ratio_to_naive"],
                "met_fraction_processes": procs["fraction_of_limit"] >= 0.70,
                "met_ratio_processes": procs["ratio_to_naive"] >= 3.0})
    path = common.write_result(NAME, data, args.out)

    headers = ["encoder", "path", "dtype", "clips", "media s", "media s/s", "matmul GFLOP/s", "FLOP limit s/s", "of limit",
               "x naive", "padding"]
    rows = []
    for r in w_rows + o_rows:
        matmul = r.get("matmul_flops_per_s") or (rates["float32"]["flops_per_s"] if r.get("flops") else None)
        rows.append([r["encoder"], r["path"], r["dtype"], r["clips"], r["media_s"], r["media_s_per_s"],
                     None if matmul is None else matmul / 1e9, r["flop_limit_media_s_per_s"],
                     None if r["fraction_of_limit"] is None else f"{100 * r['fraction_of_limit']:.0f}%",
                     f"{r['ratio_to_naive']:.2f}x",
                     None if r["padding_fraction"] is None else f"{100 * r['padding_fraction']:.1f}%"])
    mm = ", ".join(f"{d} {rates[d]['flops_per_s'] / 1e9:.0f}" for d in rates)
    title = (f"Extraction ({dev}, {threads['threads']} torch thread(s); matmul GFLOP/s before/after the run {mm}; wav2vec2-base {w_info['gflop_per_audio_second']:.1f} "
             f"GFLOP per audio second){' [QUICK: not a measurement]' if args.quick else ''}")
    print(common.table(rows, headers, title))
    if bf16:
        t = data["targets"]
        print(f"targets: bf16 pipeline at {100 * t['pipeline_bf16_fraction_of_bf16_limit']:.0f}% of the bf16 limit "
              f"(target 70%: {'met' if t['met_fraction'] else 'MISSED'}); {t['pipeline_bf16_ratio_to_naive']:.2f}x the "
              f"naive fp32 loop (target 3x: {'met' if t['met_ratio'] else 'MISSED'})")
        if "processes_bf16_ratio_to_naive" in t:
            print(f"         2 processes x 1 thread: {100 * t['processes_bf16_fraction_of_bf16_limit']:.0f}% of the bf16 limit "
                  f"({'met' if t['met_fraction_processes'] else 'MISSED'}); {t['processes_bf16_ratio_to_naive']:.2f}x the "
                  f"naive loop ({'met' if t['met_ratio_processes'] else 'MISSED'})")
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
