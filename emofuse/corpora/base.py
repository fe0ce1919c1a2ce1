"""What every corpus reader produces: Utterance records and the protocol they are scored under."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODALITIES = ("audio", "text", "video")
# The paper's one-letter names, used for ablation tables (A, T, V, AT, ...).
LETTER = {"audio": "A", "text": "T", "video": "V"}


@dataclass
class Utterance:
    id: str
    speaker: str | None = None
    dialogue: str | None = None
    text: str | None = None
    audio: str | None = None  # path to an audio (or audio-visual) file
    video: str | None = None  # path to a video file
    start: float | None = None  # seconds into the media; None = whole file
    end: float | None = None
    split: str | None = None  # train | dev | test (or a fold name)
    labels: dict = field(default_factory=dict)
    # modality -> why the corpus reader could not use it (e.g. a transcript that is not valid UTF-8);
    # extraction records it in that modality's failures.jsonl instead of encoding it
    unusable: dict = field(default_factory=dict)


@dataclass
class Protocol:
    """How a corpus is scored: which label, which classes, which splits."""

    name: str  # e.g. "demo-4class", written into every report
    label: str  # key into Utterance.labels
    # classification: the label is one class name. regression: a number. multilabel: one binary
    # head per class; the label is a class name (one-hot: IEMOCAP's four binary heads) or a list
    # of the class names present (CMU-MOSEI's emotions).
    task: str = "classification"  # classification | regression | multilabel
    classes: list[str] = field(default_factory=list)
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"


@dataclass
class Corpus:
    name: str
    utterances: list[Utterance]
    protocol: Protocol

    def split(self, name: str) -> list[Utterance]:
        return [u for u in self.utterances if u.split == name]


def write_utterances(utterances: list[Utterance], path: Path) -> None:
    """Labels live here, never in the feature stores: a new protocol needs no re-extraction."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for u in utterances:
            f.write(json.dumps(asdict(u), ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_utterances(path: Path) -> list[Utterance]:
    with open(path, encoding="utf-8") as f:
        return [Utterance(**json.loads(line)) for line in f if line.strip()]
