"""GPU exactness of the hf audio path at wav2vec2-base size (random weights), for bench/gpu_check.sh.

The tests prove exactness on the CPU with tiny models; this checks the same properties on a CUDA
GPU at full size, where other kernels (cuBLAS, cuDNN convolutions, fused attention) run:

  - fp32: emofuse's batched, padded forward on the GPU (channels-last conv feature encoder with the
    GroupNorm folded in, masks) against transformers' own unpadded forward of each clip in float64
    on the CPU; transformers' own fp32 forward on the GPU beside it as the floor;
  - batched equals one at a time on the GPU;
  - bf16 autocast: emofuse's error against the same reference, next to transformers' own forward
    under autocast on the GPU.

Both variants: group-norm feature encoder (wav2vec2-base) and layer-norm (wav2vec2-large-lv60
style). Prints a table and writes JSON (gpu_exactness.json). Not a test: it needs a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository on sys.path)

NAME = "gpu_exactness"


def relative_error(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(folder: Path, clips, device: str) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModel

    from emofuse.corpora.base import Utterance
    from emofuse.extract.encoders.base import build_encoder
    from emofuse.extract.encoders.hf import precision

    utts = [Utterance(id=p.stem, audio=str(p)) for p, _ in clips]
    f32 = build_encoder("audio", {"backend": "hf", "path": str(folder), "device": device})
    bf16 = build_encoder("audio", {"backend": "hf", "path": str(folder), "device": device, "dtype": "bfloat16"})
    items = [f32.prepare(u) for u in utts]

    reference = AutoModel.from_pretrained(folder, local_files_only=True).eval().double()
    plain = AutoModel.from_pretrained(folder, local_files_only=True).eval().to(device)
    refs, plain32, plain16 = [], [], []
    with torch.inference_mode():
        for x in items:
            refs.append(reference(torch.from_numpy(x)[None].double()).last_hidden_state[0].float().numpy())
            xg = torch.from_numpy(x)[None].to(device)
            with precision(None, device):
                plain32.append(plain(xg).last_hidden_state[0].float().cpu().numpy())
            with precision(torch.bfloat16, device):
                plain16.append(plain(xg).last_hidden_state[0].float().cpu().numpy())

    forwards = []
    inner = f32._forward_padded
    f32._forward_padded = lambda inputs, n=None: forwards.append(len(inputs)) or inner(inputs, n)
    ours32 = f32.encode(items)
    alone32 = [f32.encode([x])[0] for x in items]
    ours16 = bf16.encode(items)
    return {
        "feature_encoder": f32.feature_encoder,
        "masked": f32.masked,
        "clip_seconds": [round(d, 3) for _, d in clips],
        "inputs_per_forward": forwards,
        "fp32_max_abs_vs_float64": max(float(np.abs(a - r).max()) for a, r in zip(ours32, refs)),
        "fp32_rel_vs_float64": max(relative_error(a, r) for a, r in zip(ours32, refs)),
        "transformers_fp32_max_abs_vs_float64": max(float(np.abs(a - r).max()) for a, r in zip(plain32, refs)),
        "transformers_fp32_rel_vs_float64": max(relative_error(a, r) for a, r in zip(plain32, refs)),
        "batched_vs_alone_max_abs": max(float(np.abs(a - b).max()) for a, b in zip(ours32, alone32)),
        "bf16_rel_vs_float64": max(relative_error(a, r) for a, r in zip(ours16, refs)),
        "transformers_bf16_rel_vs_float64": max(relative_error(a, r) for a, r in zip(plain16, refs)),
    }


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    args = p.parse_args(argv)
    common.quiet_transformers()
    results = {}
    with common.temp_dir(args.tmp, NAME) as tmp:
        # Two pairs of close lengths and one clip alone: each pair is one padded forward (a forward
        # is cut where it would be more than 10% padding: hf.MAX_PADDING), so "batched" really pads
        # one input in a forward with another. (Run 3 of 2026-11-27, before that cut, ran all five
        # in one forward.)
        seconds = [1.6, 1.7, 4.3, 4.4, 7.7]
        clips = common.write_clips(tmp / "clips", len(seconds), 0, 0, seed=3, durations=seconds)
        for name, overrides in [("wav2vec2-base (group norm)", {}), ("layer-norm variant", {"feat_extract_norm": "layer"})]:
            common.log(f"[gpu-exactness] {name}")
            folder = common.make_wav2vec2(tmp / name.split()[0] / overrides.get("feat_extract_norm", "group"), **overrides)
            results[name] = check(folder, clips, args.device)
    data = {"device": args.device, "models": results}
    common.write_result(NAME, data, args.out)
    headers = ["model", "feature encoder", "fp32 max abs", "fp32 rel", "transformers fp32 rel", "batched vs alone",
               "bf16 rel", "transformers bf16 rel"]
    rows = [[name, r["feature_encoder"], f"{r['fp32_max_abs_vs_float64']:.1e}", f"{r['fp32_rel_vs_float64']:.1e}",
             f"{r['transformers_fp32_rel_vs_float64']:.1e}", f"{r['batched_vs_alone_max_abs']:.1e}",
             f"{r['bf16_rel_vs_float64']:.2%}", f"{r['transformers_bf16_rel_vs_float64']:.2%}"] for name, r in results.items()]
    print(common.table(rows, headers, f"GPU exactness ({args.device}): errors against transformers in float64 on the CPU"))
    return data


if __name__ == "__main__":
    main()
