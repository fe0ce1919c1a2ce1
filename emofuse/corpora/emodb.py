"""Emo-DB, the Berlin Database of Emotional Speech (Burkhardt et al. 2005): 10 actors (5 female,
5 male) speak 10 German sentences in 7 emotions; 535 utterances. Audio only.

Layout: <root>/wav/*.wav (or the wav files directly in <root>). A name like 03a01Fa.wav reads
speaker 03, sentence a01, emotion F (happiness), version a. The same sentences are spoken in every
emotion, so the text carries no emotion: text is None (extraction of the text modality finds
nothing to encode), and only speaker-independent splits are honest.

Protocol "loso" (leave one speaker out): option fold = the test speaker ("03", or 3; default the
first speaker, 03); dev = the next speaker in sorted order (after the last: the first); the other
eight train.
"""

from __future__ import annotations

import re
from pathlib import Path

from emofuse.corpora.base import Corpus, Protocol, Utterance
from emofuse.errors import UserError

EMOTIONS = {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear", "F": "happiness", "T": "sadness", "N": "neutral"}
CLASSES = list(EMOTIONS.values())
FEMALE = {"08", "09", "13", "14", "16"}  # from the corpus documentation; the others are male
NAME = re.compile(r"^(\d\d)([ab]\d\d)([WLEAFTN])([a-z])$")


def folds(root: Path, protocol: str = "") -> list[str]:
    """Every leave-one-speaker-out fold: the test speaker ids."""
    wav_dir = Path(root) / "wav" if (Path(root) / "wav").is_dir() else Path(root)
    return sorted({m.group(1) for p in wav_dir.glob("*.wav") if (m := NAME.match(p.stem))})


def load(root: Path, protocol: str = "", fold="", **unknown) -> Corpus:
    if unknown:
        raise UserError(f"Emo-DB: unknown option(s) {', '.join(sorted(unknown))} (available: fold)")
    if protocol not in ("", "loso"):
        raise UserError(f"Emo-DB: unknown protocol {protocol!r} (available: loso)")
    root = Path(root)
    wav_dir = root / "wav" if (root / "wav").is_dir() else root
    files = sorted(wav_dir.glob("*.wav"))
    if not files:
        raise UserError(f"Emo-DB: expected wav/*.wav (e.g. 03a01Fa.wav) in {root}")

    utterances = []
    for path in files:
        m = NAME.match(path.stem)
        if not m:
            raise UserError(f"Emo-DB: unexpected file name {path.name} in {wav_dir} (expected e.g. 03a01Fa.wav)")
        speaker, sentence, code, _ = m.groups()
        utterances.append(Utterance(
            id=path.stem, speaker=speaker, text=None, audio=str(path.resolve()),
            labels={"emotion": EMOTIONS[code], "sentence": sentence,
                    "gender": "female" if speaker in FEMALE else "male"}))

    speakers = sorted({u.speaker for u in utterances})
    test = f"{int(fold):02d}" if str(fold).strip().isdigit() else (str(fold).strip() or speakers[0])
    if test not in speakers:
        raise UserError(f"Emo-DB: fold must be one of the speakers {', '.join(speakers)}, got {fold!r}")
    dev = speakers[(speakers.index(test) + 1) % len(speakers)]
    for u in utterances:
        u.split = "test" if u.speaker == test else "dev" if u.speaker == dev else "train"
    return Corpus(name="emodb", utterances=utterances,
                  protocol=Protocol(name=f"emodb-loso-{test}", label="emotion", classes=list(CLASSES)))
