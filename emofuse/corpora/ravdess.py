"""RAVDESS (Livingstone & Russo 2018): 24 actors (odd ids male, even female) say two fixed
statements in 8 emotions; audio-only .wav and audio-visual .mp4 recordings.

Layout: Actor_01 .. Actor_24 folders anywhere under <root> (as the zips unpack:
Audio_Speech_Actors_01-24/Actor_XX/*.wav, Video_Speech_Actor_XX/Actor_XX/*.mp4). A file name has 7
fields: modality (01 audio-visual, 02 video-only, 03 audio-only) - vocal channel (01 speech,
02 song) - emotion (01..08) - intensity (01 normal, 02 strong) - statement (01, 02) - repetition
(01, 02) - actor (01..24), e.g. 03-01-06-01-02-01-12.wav.

One utterance per recording (the last six fields, e.g. "01-06-01-02-01-12"): audio = the
audio-only .wav when present, else the audio-visual .mp4; video = the audio-visual .mp4 when
present. Video-only files (modality 02) add nothing the audio-visual file lacks and are skipped.
text = the statement (the same two sentences in every emotion, so text carries no emotion).

Protocol "emotion" (8 classes), speaker-independent: option fold = the test actor(s) (12, "12",
"1,2" or a list; default 1,2: one male, one female), option dev = the dev actor(s) (default: as
many actors as the test, the next ones after the last test actor, cyclically); the rest train.
Option channel: speech (default), song (6 emotions: no disgust or surprise) or all.
"""

from __future__ import annotations

import re
from pathlib import Path

from emofuse.corpora.base import Corpus, Protocol, Utterance
from emofuse.errors import UserError

EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
            "07": "disgust", "08": "surprised"}
CLASSES = list(EMOTIONS.values())
STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
CHANNELS = {"speech": {"01"}, "song": {"02"}, "all": {"01", "02"}}
NAME = re.compile(r"^(0[123])-(0[12])-(0[1-8])-(0[12])-(0[12])-(0[12])-(\d\d)$")


def _actors(value, what: str) -> list[int]:
    """12 | "12" | "1,2" | [1, 2] -> sorted actor numbers."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    try:
        actors = sorted({int(x) for x in items if str(x) != ""})
    except ValueError:
        actors = []
    if not actors or any(not 1 <= a <= 24 for a in actors):
        raise UserError(f"RAVDESS: {what} must be actor numbers 1-24 (e.g. 12 or \"1,2\"), got {value!r}")
    return actors


def load(root: Path, protocol: str = "", fold=(1, 2), dev=None, channel: str = "speech", **unknown) -> Corpus:
    if unknown:
        raise UserError(f"RAVDESS: unknown option(s) {', '.join(sorted(unknown))} (available: fold, dev, channel)")
    if protocol not in ("", "emotion", "8class"):
        raise UserError(f"RAVDESS: unknown protocol {protocol!r} (available: emotion)")
    if channel not in CHANNELS:
        raise UserError(f"RAVDESS: channel must be speech, song or all, got {channel!r}")
    test = _actors(fold, "fold")
    if dev is None:
        dev_actors, actor = [], test[-1]
        while len(dev_actors) < len(test):
            actor = actor % 24 + 1
            if actor not in test:
                dev_actors.append(actor)
    else:
        dev_actors = _actors(dev, "dev")
    if set(test) & set(dev_actors) or len(test) + len(dev_actors) >= 24:
        raise UserError(f"RAVDESS: test actors {test} and dev actors {dev_actors} must be disjoint and leave actors to train")

    root = Path(root)
    files: dict[str, dict[str, Path]] = {}  # recording -> {"wav": path, "mp4": path}
    for path in sorted(root.rglob("Actor_*/*")):
        m = NAME.match(path.stem)
        if not m or path.suffix.lower() not in (".wav", ".mp4") or m[1] == "02" or m[2] not in CHANNELS[channel]:
            continue
        files.setdefault(path.stem[3:], {})["wav" if m[1] == "03" else "mp4"] = path.resolve()
    if not files:
        raise UserError(f"RAVDESS: expected Actor_XX/*.wav or *.mp4 files (e.g. Actor_01/03-01-01-01-01-01-01.wav) under {root}")

    utterances = []
    for rec, paths in sorted(files.items()):
        channel_code, emotion, intensity, statement, repetition, actor = rec.split("-")
        number = int(actor)
        split = "test" if number in test else "dev" if number in dev_actors else "train"
        audio = paths.get("wav") or paths.get("mp4")
        utterances.append(Utterance(
            id=rec, speaker=f"Actor_{actor}", text=STATEMENTS[statement], audio=str(audio),
            video=str(paths["mp4"]) if "mp4" in paths else None, split=split,
            labels={"emotion": EMOTIONS[emotion], "intensity": "strong" if intensity == "02" else "normal",
                    "channel": "song" if channel_code == "02" else "speech", "repetition": int(repetition),
                    "gender": "male" if number % 2 else "female"}))
    test_name = "+".join(f"{a:02d}" for a in test)
    return Corpus(name="ravdess", utterances=utterances,
                  protocol=Protocol(name=f"ravdess-8class-test{test_name}", label="emotion", classes=list(CLASSES)))
