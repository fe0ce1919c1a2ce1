"""MELD (Poria et al., ACL 2019): utterances of Friends dialogues, 7 emotions and 3 sentiments.

Layout (the `MELD.Raw` release, or just its three CSV files for a text-only copy):

    <root>/train_sent_emo.csv  dev_sent_emo.csv  test_sent_emo.csv
    <root>/train_splits/dia{D}_utt{U}.mp4             (train clips)
    <root>/dev_splits_complete/dia{D}_utt{U}.mp4      (dev clips)
    <root>/output_repeated_splits_test/dia{D}_utt{U}.mp4   (test clips)

The official splits are the three files. Dialogue ids restart in every file, so ids carry the
split: `train_dia0_utt0`. Each clip already holds one utterance (audio and video in one mp4), so
start/end stay None; StartTime/EndTime (hh:mm:ss,ms into the episode) are kept in labels as
episode_start / episode_end. A clip folder that exists but lacks a clip (dev dia110_utt7 and
train dia125_utt3 are missing or broken in the release) still gets its path: extraction records
the failure for that utterance and goes on.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from emofuse.corpora.base import Corpus, Protocol, Utterance
from emofuse.errors import UserError

SPLITS = ("train", "dev", "test")
CLIP_DIRS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}

PROTOCOLS = {
    "emotion": ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"],
    "sentiment": ["negative", "neutral", "positive"],
}

# MELD's text comes with Windows-1252 punctuation in one of three forms, depending on the copy:
#   - the original release: cp1252 code points kept as C1 control characters ("\x92" for an apostrophe);
#   - the fixed CSVs (declare-lab/MELD PR #28, as in ../shared/data/meld): curly Unicode quotes;
#   - copies re-saved by a tool that read UTF-8 as cp1252: mojibake such as "â€™".
# All become plain ASCII, so a sentence gives the same tokens whatever copy a user has.
PUNCTUATION = str.maketrans({
    "\x85": "...", "\u2026": "...",
    "\x91": "'", "\x92": "'", "\u2018": "'", "\u2019": "'",
    "\x93": '"', "\x94": '"', "\u201c": '"', "\u201d": '"',
    "\x96": "-", "\x97": "-", "\u2013": "-", "\u2014": "-",
    "\xa0": " ",
})


def _mojibake() -> dict[str, str]:
    """'â€™' -> '’' etc.: each curly character's UTF-8 bytes as cp1252 or latin-1 would show them
    (cp1252 leaves a few bytes undefined; those pass through as latin-1 does)."""
    def cp1252(b: int) -> str:
        try:
            return bytes([b]).decode("cp1252")
        except UnicodeDecodeError:
            return chr(b)

    table = {}
    for char in "\u2018\u2019\u201c\u201d\u2026\u2013\u2014":
        raw = char.encode("utf-8")
        table["".join(cp1252(b) for b in raw)] = char
        table[raw.decode("latin-1")] = char
    return table


MOJIBAKE = _mojibake()


def clean_text(text: str) -> str:
    for wrong, right in MOJIBAKE.items():
        text = text.replace(wrong, right)
    return " ".join(text.translate(PUNCTUATION).split())


def parse_time(value: str) -> float:
    """'00:16:16,059' -> 976.059 seconds."""
    m = re.fullmatch(r"\s*(\d+):(\d+):(\d+)[,.](\d+)\s*", value)
    if not m:
        raise ValueError(f"not a hh:mm:ss,ms time: {value!r}")
    h, mnt, s, ms = m.groups()
    return int(h) * 3600 + int(mnt) * 60 + int(s) + int(ms) / 10 ** len(ms)


def _read_csv(path: Path) -> list[dict]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # a copy saved as cp1252 bytes
        text = raw.decode("cp1252", errors="replace")
    return list(csv.DictReader(text.splitlines(keepends=True)))


def _find_root(root: Path) -> Path:
    for base in (root, root / "MELD.Raw"):
        if all((base / f"{s}_sent_emo.csv").is_file() for s in SPLITS):
            return base
    missing = [f"{s}_sent_emo.csv" for s in SPLITS if not (root / f"{s}_sent_emo.csv").is_file()]
    raise UserError(f"MELD: expected {', '.join(missing)} in {root} (the MELD.Raw folder)")


def load(root: Path, protocol: str = "", **options) -> Corpus:
    """protocol: "emotion" (default, 7 classes) or "sentiment" (3 classes). No options."""
    if options:
        raise UserError(f"MELD takes no options (got {', '.join(sorted(options))})")
    protocol = protocol or "emotion"
    if protocol not in PROTOCOLS:
        raise UserError(f"MELD: unknown protocol {protocol!r} (available: {', '.join(PROTOCOLS)})")
    root = _find_root(Path(root))

    utterances = []
    for split in SPLITS:
        # The clip folder sits in the root (MELD.Raw) or, once each split's archive is unpacked
        # in place, under train/, dev/, test/.
        clip_dir = next((d for d in (root / CLIP_DIRS[split], root / split / CLIP_DIRS[split]) if d.is_dir()), None)
        path = root / f"{split}_sent_emo.csv"
        for n, row in enumerate(_read_csv(path), start=2):
            try:
                d, u = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
                labels = {"emotion": row["Emotion"].strip().lower(), "sentiment": row["Sentiment"].strip().lower(),
                          "season": int(row["Season"]), "episode": int(row["Episode"]),
                          "episode_start": parse_time(row["StartTime"]), "episode_end": parse_time(row["EndTime"])}
                text = clean_text(row["Utterance"])
                speaker = row["Speaker"].strip()
            except (KeyError, ValueError) as e:
                raise UserError(f"MELD: {path} line {n}: bad or missing column ({e})") from None
            for key, classes in PROTOCOLS.items():
                if labels[key] not in classes:
                    raise UserError(f"MELD: {path} line {n}: unknown {key} {labels[key]!r}")
            clip = str((clip_dir / f"dia{d}_utt{u}.mp4").resolve()) if clip_dir else None
            utterances.append(Utterance(
                id=f"{split}_dia{d}_utt{u}", speaker=speaker, dialogue=f"{split}_dia{d}", text=text,
                audio=clip, video=clip, split=split, labels=labels))

    return Corpus(name="meld", utterances=utterances,
                  protocol=Protocol(name=f"meld-{protocol}", label=protocol, classes=list(PROTOCOLS[protocol])))
