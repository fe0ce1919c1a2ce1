"""Text padding: MiniLM extraction through the pipeline under the old policy (texts padded to
multiples of 16 tokens) and the current one (exact lengths), side by side.

Per corpus and policy: padded positions / all positions in the encoder's forwards (extraction.py's
instrument), the number of forwards, and the wall time of extract_modality into a fresh store.
Corpora: the transcripts of the generated small demo corpus and, when ../shared/data/meld is there,
MELD's 13,708 transcripts (train + dev + test). The old policy is reproduced by setting
hf.PAD_MULTIPLE["text"] back to 16: an uninterrupted run has the same batch plan under both (the
plan only changed for resumed runs), so the two differ in padding alone. Runs alternate between the
policies (--repeats times each) so that a change in the machine's load hits both alike.

Not part of `make bench`: python bench/text_padding.py [--threads 1] [--repeats 2] [--quick].
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository on sys.path)
from extraction import instrument, padding_fraction  # noqa: E402

NAME = "text_padding"
MELD = common.ROOT.parent / "shared" / "data" / "meld"
POLICIES = {"multiples of 16 (old)": 16, "exact lengths": 1}


def corpora(tmp: Path, quick: bool, demo_root: str | None) -> dict:
    from emofuse.corpora import demo, meld

    root = demo.generate(Path(demo_root) if demo_root else tmp / "demo", size="small", progress=False)
    found = {"demo (small)": demo.load(root).utterances}
    if MELD.is_dir():
        found["MELD"] = meld.load(MELD).utterances
    else:
        common.log(f"[{NAME}] {MELD} not found: MELD skipped")
    return {name: utts[:200] if quick else utts for name, utts in found.items()}


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--repeats", type=int, default=2, help="runs per corpus and policy, alternating")
    p.add_argument("--demo-root", default=None, help="an already generated small demo corpus (default: generate one)")
    args = p.parse_args(argv)
    threads = common.setup_threads(args.threads)
    common.quiet_transformers()

    from emofuse.extract.encoders import hf
    from emofuse.extract.encoders.base import build_encoder

    rows = []
    with common.temp_dir(args.tmp, "text-padding") as tmp:
        encoder = build_encoder("text", {"backend": "minilm", "device": args.device})
        encoder.full_spec()  # hash the weights outside the clock
        stats = instrument(encoder)
        for corpus, utts in corpora(tmp, args.quick, args.demo_root).items():
            for rep in range(args.repeats):
                for policy, multiple in POLICIES.items():
                    hf.PAD_MULTIPLE["text"] = multiple
                    for key in stats:
                        stats[key] = 0
                    start = time.perf_counter()
                    result = _extract(utts, encoder, tmp / f"{corpus}-{multiple}-{rep}")
                    seconds = time.perf_counter() - start
                    rows.append({"corpus": corpus, "policy": policy, "run": rep + 1, "utterances": len(utts),
                                 "encoded": result.encoded, "failed": result.failed, "seconds": seconds,
                                 "forwards": stats["forwards"], "positions": stats["padded"],
                                 "padding_fraction": padding_fraction(stats)})
                    common.log(f"[{NAME}] {corpus}, {policy}, run {rep + 1}: {seconds:.1f} s, "
                               f"padding {100 * rows[-1]['padding_fraction']:.2f}%")
        hf.PAD_MULTIPLE["text"] = POLICIES["exact lengths"]

    data = {"quick": args.quick, "device": args.device, "threads": threads, "rows": rows}
    common.write_result(NAME, data, args.out)
    headers = ["corpus", "policy", "run", "utterances", "forwards", "positions", "padding", "seconds"]
    print(common.table([[r["corpus"], r["policy"], r["run"], r["utterances"], r["forwards"], r["positions"],
                         f"{100 * r['padding_fraction']:.2f}%", f"{r['seconds']:.1f}"] for r in rows], headers,
                       f"MiniLM text extraction, padded positions / all positions in the forwards, "
                       f"{threads['threads']} thread(s){' [QUICK: not a measurement]' if args.quick else ''}"))
    return data


def _extract(utts, encoder, cache_dir: Path):
    from emofuse.extract.pipeline import extract_modality

    # The batch budget of the default config (extract.batch_budget.text).
    return extract_modality(utts, encoder, cache_dir, budget=8192, progress=False, log=lambda *a: None)


if __name__ == "__main__":
    main()
