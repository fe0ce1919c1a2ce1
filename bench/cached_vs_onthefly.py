"""Cached versus on the fly: one training epoch of the same fusion model, fed from the feature cache,
next to the original SSE-FT design that re-runs the frozen encoders inside every training step.

Both sides train the same SSEFT model (the `fast` preset, FusionConfig defaults) with the same
batches (make_batches, batch size 8), the same collate, L1 loss and AdamW, over the same
utterances (default 200, audio of 2-6 s, 10-50 text tokens, face frames at 10 fps):

  cached      features read from feature stores written through emofuse.cache (CachedData, which
              preloads them: they fit the default budget); one whole epoch is timed.
  on the fly  every step runs the frozen encoders first, as the original code did (fp32, no_grad):
              a wav2vec2-base-sized audio encoder (one clip at a time: its group-norm feature encoder
              cannot take padded batches), a RoBERTa-base-sized text encoder on the batch padded to
              512 tokens like the original (--text-pad batch pads to the longest instead), and FabNet
              (emofuse.extract.encoders.fabnet.FabNet, the 8-conv 3-32-64-128-256-256-256-256-256 net)
              on every face frame (256x256). Random weights: the FLOPs are those of the real models.
              Media are already decoded in memory (the original also decoded files every step, so this
              side is favoured). A few steps are timed and the epoch is extrapolated from them.
The features the cache holds have exactly the shapes the encoders produce, so the fusion model
sees the same sequence lengths on both sides. The ratio per epoch is printed, with the FLOP ratio
(torch's flop counter on one step of each side), and a FLOP-only estimate at the paper's sizes
(RoBERTa-large on 512 tokens, wav2vec2-large on 9.4 s, FabNet on 300 frames, the `paper` preset),
counted on meta tensors (no weights, no compute).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "cached_vs_onthefly"
SR = 16000
DIMS = {"audio": 768, "text": 768, "video": 256}


def conv_frames(samples: int) -> int:
    from emofuse.extract.encoders.chunking import conv_output_length

    return conv_output_length(samples, [10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2])


def make_corpus(n: int, video_fps: float, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        dur = float(rng.uniform(2.0, 6.0))
        samples = int(dur * SR)
        out.append({"id": f"utt{i:04d}", "seconds": dur, "samples": samples, "frames": conv_frames(samples),
                    "tokens": int(rng.integers(10, 51)), "faces": max(1, int(round(dur * video_fps))),
                    "label": float(np.clip(rng.normal(0, 1.3), -3, 3))})
    return out


def build_cache(cache_dir: Path, corpus: list[dict]) -> None:
    """Feature stores with the shapes the three encoders produce for each utterance."""
    import numpy as np

    from emofuse.cache.store import FeatureStore
    from emofuse.corpora.base import Protocol, Utterance, write_utterances
    from emofuse.extract.encoders.base import fingerprint

    rng = np.random.default_rng(1)
    length = {"audio": "frames", "text": "tokens", "video": "faces"}
    for m, dim in DIMS.items():
        spec = {"backend": "bench-random", "modality": m, "dim": dim}
        store = FeatureStore.create(cache_dir / f"{m}-bench", m, spec, fingerprint(spec), dim=dim)
        with store.writer("bench") as w:
            for u in corpus:
                w.add(u["id"], rng.standard_normal((u[length[m]] + (2 if m == "text" else 0), dim)).astype(np.float16))
        store.close()
    write_utterances([Utterance(id=u["id"], split="train", labels={"score": u["label"]}) for u in corpus],
                     cache_dir / "utterances.jsonl")
    (cache_dir / "protocol.json").write_text(json.dumps(
        Protocol(name="bench", label="score", task="regression").__dict__))


def fusion(seed: int = 0, preset: str = "fast"):
    import torch

    from emofuse.fuse.model import SSEFT, FusionConfig
    from emofuse.fuse.train import adamw

    torch.manual_seed(seed)
    cfg = FusionConfig(modalities=["audio", "text", "video"], input_dims=DIMS, num_layers_in={}, num_outputs=1,
                       preset=preset)
    model = SSEFT(cfg)
    return model, adamw(model, lr=3e-4, weight_decay=0.01)


def train_step(model, opt, feats, masks, present, y):
    import torch
    import torch.nn.functional as F

    loss = F.l1_loss(model(feats, masks, present).squeeze(-1), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


class Encoders:
    """The three frozen encoders of the original design, random weights, fp32."""

    def __init__(self, text_pad: str, seed: int = 0):
        import torch
        from transformers import RobertaConfig, RobertaModel, Wav2Vec2Config, Wav2Vec2Model

        from emofuse.extract.encoders.fabnet import FabNet

        common.quiet_transformers()
        torch.manual_seed(seed)
        self.audio = Wav2Vec2Model(Wav2Vec2Config()).eval().requires_grad_(False)
        self.text = RobertaModel(RobertaConfig(), add_pooling_layer=False).eval().requires_grad_(False)
        self.video = FabNet().eval().requires_grad_(False)
        self.text_pad = text_pad
        self.pad_id = RobertaConfig().pad_token_id
        self.faces = torch.randint(0, 256, (64, 256, 256, 3), dtype=torch.uint8)  # decoded face crops
        self.timing = {"audio": 0.0, "text": 0.0, "video": 0.0}

    def media(self, u: dict, seed: int):
        import numpy as np
        import torch

        rng = np.random.default_rng(seed)
        wav = torch.from_numpy(rng.standard_normal(u["samples"]).astype(np.float32) * 0.1)
        ids = torch.from_numpy(rng.integers(4, 50000, u["tokens"]))
        faces = torch.from_numpy(rng.integers(0, len(self.faces), u["faces"]))
        return wav, ids, faces

    def encode(self, batch: list[dict]) -> dict[str, dict[str, "np.ndarray"]]:
        import torch

        media = [self.media(u, k) for k, u in enumerate(batch)]
        out = {"audio": {}, "text": {}, "video": {}}
        with torch.no_grad():
            t = time.perf_counter()
            for u, (wav, _, _) in zip(batch, media):
                x = (wav - wav.mean()) / (wav.std() + 1e-7)
                out["audio"][u["id"]] = self.audio(x[None]).last_hidden_state[0].numpy()
            t2 = time.perf_counter()
            self.timing["audio"] += t2 - t
            # <s> tokens </s>, padded to 512 (the original) or to the batch's longest
            seqs = [torch.cat([torch.tensor([0]), ids, torch.tensor([2])]) for _, ids, _ in media]
            n = 512 if self.text_pad == "512" else max(len(s) for s in seqs)
            ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), n), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = s
                mask[i, : len(s)] = 1
            h = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
            for i, (u, s) in enumerate(zip(batch, seqs)):
                out["text"][u["id"]] = h[i, : len(s)].numpy()
            t3 = time.perf_counter()
            self.timing["text"] += t3 - t2
            frames = torch.cat([self.faces[f] for _, _, f in media]).permute(0, 3, 1, 2)
            feats = torch.cat([self.video(frames[i : i + 64].float().div(255.0)) for i in range(0, len(frames), 64)])
            k = 0
            for u, (_, _, f) in zip(batch, media):
                out["video"][u["id"]] = feats[k : k + len(f)].numpy()
                k += len(f)
            self.timing["video"] += time.perf_counter() - t3
        return out


def paper_size_flops(cached_frames: dict, preset: str = "paper") -> dict:
    """FLOPs per sample at the paper's sizes, on meta tensors (shapes only): on the fly = encoders +
    one training step of the fusion model; cached = the training step alone."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import RobertaConfig, RobertaModel, Wav2Vec2Config, Wav2Vec2Model

    from emofuse.extract.encoders.fabnet import FabNet
    from emofuse.fuse.model import SSEFT, FusionConfig

    common.quiet_transformers()
    out = {}
    with torch.device("meta"):
        # eval(): frozen encoders (in training mode wav2vec2's LayerDrop would skip random layers)
        roberta = RobertaModel(RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                             intermediate_size=4096), add_pooling_layer=False).eval()
        w2v = Wav2Vec2Model(Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                           intermediate_size=4096)).eval()
        fab = FabNet().eval()
        cfg = FusionConfig(modalities=["audio", "text", "video"], input_dims={"audio": 512, "text": 1024, "video": 256},
                           num_layers_in={}, num_outputs=1, preset=preset)
        model = SSEFT(cfg)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            roberta(input_ids=torch.zeros(1, 512, dtype=torch.long, device="meta"))
        out["roberta_large_512_tokens"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            w2v(torch.zeros(1, int(9.4 * SR), device="meta"))
        out["wav2vec2_large_9.4s"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            fab(torch.zeros(300, 3, 256, 256, device="meta"))
        out["fabnet_300_frames"] = fc.get_total_flops()
    B = 8
    feats = {m: torch.zeros(B, cached_frames[m], d, device="meta") for m, d in cfg.input_dims.items()}
    masks = {m: torch.ones(B, cached_frames[m], dtype=torch.bool, device="meta") for m in cfg.input_dims}
    with FlopCounterMode(display=False) as fc:
        loss = F.l1_loss(model(feats, masks).squeeze(-1), torch.zeros(B, device="meta"))
        loss.backward()
    out["fusion_step_per_sample"] = fc.get_total_flops() / B
    out["encoders"] = out["roberta_large_512_tokens"] + out["wav2vec2_large_9.4s"] + out["fabnet_300_frames"]
    out["ratio"] = (out["encoders"] + out["fusion_step_per_sample"]) / out["fusion_step_per_sample"]
    out["preset"] = preset
    out["cached_frames"] = cached_frames
    return out


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--utterances", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--video-fps", type=float, default=10.0)
    p.add_argument("--otf-steps", type=int, default=3, help="on-the-fly steps timed (the epoch is extrapolated)")
    p.add_argument("--text-pad", choices=["512", "batch"], default="512",
                   help="on the fly: pad text to 512 tokens (the original) or to the batch's longest")
    p.add_argument("--no-paper-estimate", action="store_true")
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from emofuse.fuse.data import CachedData, Normalizer, collate, make_batches

    threads = common.setup_threads(args.threads)
    common.log(f"[cached_vs_onthefly] torch threads: {threads}")
    n = 8 if args.quick else args.utterances
    otf_steps = 1 if args.quick else args.otf_steps
    if args.quick:
        args.batch_size = min(args.batch_size, 4)
    corpus = make_corpus(n, args.video_fps)
    by_id = {u["id"]: u for u in corpus}
    rate = common.matmul_rate("float32", seconds=1.0 if args.quick else 2.0)

    with common.temp_dir(args.tmp, NAME) as tmp:
        build_cache(tmp / "cache", corpus)
        data = CachedData(tmp / "cache", {m: {"backend": "bench-random", "modality": m} for m in DIMS},
                          ["audio", "text", "video"])
        ids = [u["id"] for u in corpus]
        lengths = {i: data.length(i) for i in ids}
        targets = data.targets()
        normalizer = Normalizer.fit(data.features, ids)
        shapes = data.frame_shapes()
        batches = make_batches(ids, lengths, args.batch_size, shuffle=True, rng=np.random.default_rng(0))

        def y_of(batch):
            return torch.tensor([targets[i] for i in batch], dtype=torch.float32)

        # --- cached: one whole epoch (after one warm-up step, not counted)
        model, opt = fusion()
        model.train()
        train_step(model, opt, *collate(batches[0], data.features, shapes, normalizer), y_of(batches[0]))
        common.log(f"[cached_vs_onthefly] cached: one epoch of {len(batches)} steps")
        t0 = time.perf_counter()
        for b in batches:
            train_step(model, opt, *collate(b, data.features, shapes, normalizer), y_of(b))
        cached_epoch = time.perf_counter() - t0

        # --- on the fly: encoders inside every step
        enc = Encoders(args.text_pad)
        small = [{**corpus[0], "samples": SR, "frames": conv_frames(SR), "faces": 2}]
        enc.encode(small)  # warm-up of each encoder, not counted
        enc.timing = {k: 0.0 for k in enc.timing}
        model, opt = fusion()
        model.train()
        common.log(f"[cached_vs_onthefly] on the fly: {otf_steps} steps of {args.batch_size}")
        otf_samples, fusion_s = 0, 0.0
        t0 = time.perf_counter()
        for b in batches[:otf_steps]:
            feats = enc.encode([by_id[i] for i in b])
            t1 = time.perf_counter()
            train_step(model, opt, *collate(b, feats, shapes, normalizer), y_of(b))
            fusion_s += time.perf_counter() - t1
            otf_samples += len(b)
        otf_s = time.perf_counter() - t0
        otf_epoch = otf_s / otf_samples * n
        enc_timing = dict(enc.timing)

        # --- FLOPs of one step of each side (outside the clock)
        from torch.utils.flop_counter import FlopCounterMode

        common.count_cpu_attention()
        b = batches[1 % len(batches)]
        feats = collate(b, data.features, shapes, normalizer)
        with FlopCounterMode(display=False) as fc:
            import torch.nn.functional as F

            F.l1_loss(model(*feats).squeeze(-1), y_of(b)).backward()
        fusion_flops = fc.get_total_flops() / len(b)
        few = [by_id[i] for i in b[:2]]  # the encoders' FLOPs per sample, on two of its samples
        with FlopCounterMode(display=False) as fc:
            enc.encode(few)
        encoder_flops = fc.get_total_flops() / len(few)
        paper = None
        if not args.no_paper_estimate:
            cached_frames = {"audio": 511, "text": 32, "video": 300}  # wav2vec 1.0: 100 Hz x 9.4 s, fitted to 511
            paper = {preset: paper_size_flops(cached_frames, preset) for preset in ("paper", "fast")}

    ratio = otf_epoch / cached_epoch
    enc_share = sum(enc_timing.values()) / otf_s
    data_out = {
        "quick": args.quick, "threads": threads, "utterances": n, "batch_size": args.batch_size,
        "video_fps": args.video_fps, "text_pad": args.text_pad, "preset": "fast",
        "mean_seconds": float(np.mean([u["seconds"] for u in corpus])),
        "mean_tokens": float(np.mean([u["tokens"] for u in corpus])),
        "mean_faces": float(np.mean([u["faces"] for u in corpus])),
        "cached_epoch_seconds": cached_epoch, "cached_steps": len(batches),
        "onthefly_steps_timed": otf_steps, "onthefly_samples_timed": otf_samples, "onthefly_seconds": otf_s,
        "onthefly_encoder_seconds": enc_timing, "onthefly_fusion_seconds": fusion_s,
        "onthefly_epoch_seconds_extrapolated": otf_epoch, "ratio_per_epoch": ratio, "target_ratio": 100.0,
        "met": ratio >= 100.0, "encoder_share_of_onthefly_step": enc_share,
        "flops_per_sample": {"fusion_step": fusion_flops, "encoders": encoder_flops},
        "flop_ratio": (encoder_flops + fusion_flops) / fusion_flops,
        "matmul_fp32_flops_per_s": rate["flops_per_s"],
        "one_time_extraction_seconds_estimate": sum(enc_timing.values()) / otf_samples * n,
        "paper_size_estimate": paper,
    }
    path = common.write_result(NAME, data_out, args.out)

    rows = [
        ["cached (emofuse)", len(batches), n, cached_epoch, n / cached_epoch, "measured, whole epoch", "1.00x"],
        ["on the fly (original design)", otf_steps, otf_samples, otf_epoch, otf_samples / otf_s,
         f"extrapolated from {otf_steps} steps", f"{ratio:.1f}x"],
    ]
    title = (f"Cached vs on the fly ({threads['threads']} thread(s); fast preset, batch {args.batch_size}; {n} utterances "
             f"of {data_out['mean_seconds']:.1f} s mean, text padded to {args.text_pad}, faces at {args.video_fps:g} fps)"
             + (" [QUICK: not a measurement]" if args.quick else ""))
    print(common.table(rows, ["path", "steps", "samples", "epoch s", "samples/s", "how", "epoch time vs cached"], title))
    print(f"ratio per epoch: {ratio:.1f}x (target 100x: {'met' if ratio >= 100 else 'MISSED'}); FLOP ratio "
          f"{data_out['flop_ratio']:.1f}x (encoders {encoder_flops / 1e9:.0f} + fusion step {fusion_flops / 1e9:.1f} "
          f"GFLOP per sample); encoders take {100 * enc_share:.0f}% of an on-the-fly step "
          f"(audio {enc_timing['audio']:.1f} s, text {enc_timing['text']:.1f} s, video {enc_timing['video']:.1f} s)")
    if paper:
        for preset, est in paper.items():
            print(f"at the paper's sizes (FLOP count only, {preset} preset): encoders {est['encoders'] / 1e9:.0f} "
                  f"GFLOP + fusion step {est['fusion_step_per_sample'] / 1e9:.1f} GFLOP per sample -> {est['ratio']:.0f}x")
    print(f"wrote {path}")
    return data_out


if __name__ == "__main__":
    main()
