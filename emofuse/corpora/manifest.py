"""Your own corpus as one CSV file: a row per utterance.

    id,audio,video,text,label,split,speaker
    u1,wav/u1.wav,,I can't believe it!,angry,train,spk1

Options (all optional):
  csv      the file, relative to root (default root/manifest.csv; root may also be the file itself)
  columns  {role: column name} for the roles id, label, split (required columns) and audio, video,
           text, speaker, dialogue, start, end (optional); a role's column defaults to its own name
  task     classification (default) | regression (labels are numbers)
  classes  class order for classification (a list or "a,b,c"; default: sorted unique labels)
  name     the corpus name, i.e. its cache folder (default "manifest")
The CSV must be UTF-8. A transcript cell that is not (e.g. a stray Latin-1 byte) makes that
utterance's text a failure with the offending byte named; any other cell that is not is an error.
Relative media paths resolve against the CSV's folder; empty cells mean "absent". Splits are
train / dev / test (valid, val, validation count as dev); an empty split or label leaves the row
out of training and scoring. Every other column is kept in labels, so another column can become
the label (columns.label=...) without extracting again; the label is stored under its column name.
"""

from __future__ import annotations

import csv as csvlib
from csv import DictReader
from pathlib import Path

from emofuse.corpora.base import Corpus, Protocol, Utterance
from emofuse.errors import UserError

ROLES = ("id", "label", "split", "audio", "video", "text", "speaker", "dialogue", "start", "end")
REQUIRED = ("id", "label", "split")
SPLITS = {"train": "train", "dev": "dev", "valid": "dev", "val": "dev", "validation": "dev", "test": "test"}


def load(root: Path, protocol: str = "", csv: str = "", columns=None, task: str = "classification",
         classes=None, name: str = "manifest", **unknown) -> Corpus:
    if unknown:
        raise UserError(f"manifest: unknown option(s) {', '.join(sorted(unknown))} "
                        f"(available: csv, columns, task, classes, name)")
    if task not in ("classification", "regression"):
        raise UserError(f"manifest: task must be classification or regression, got {task!r}")
    columns = dict(columns or {})
    bad = set(columns) - set(ROLES)
    if bad:
        raise UserError(f"manifest: unknown column role(s) {', '.join(sorted(bad))} (roles: {', '.join(ROLES)})")
    col = {role: str(columns.get(role, role)) for role in ROLES}

    root = Path(root)
    path = root if root.is_file() else root / (csv or "manifest.csv")  # an absolute csv wins over root
    if not path.is_file():
        raise UserError(f"manifest: expected the CSV file at {path} (set corpus.options.csv)")
    # surrogateescape: bytes that are not UTF-8 become lone surrogates we can find and name below,
    # instead of a UnicodeDecodeError for the whole file.
    # The csv module refuses cells over 128 KiB by default: a long transcript (a lecture, an
    # interview) is a legitimate cell, so allow any size a C long holds.
    csvlib.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = DictReader(f)
        try:
            rows = list(reader)
        except csvlib.Error as e:
            raise UserError(f"manifest: {path} line {reader.line_num}: not readable as CSV ({e})") from None
        header = reader.fieldnames or []
    for column in header:
        if _bad_utf8(column):
            raise UserError(f"manifest: {path} header: column name is not valid UTF-8 ({_bad_utf8(column)}); "
                            f"save the CSV as UTF-8")
    missing = [f"{col[r]} ({r})" for r in REQUIRED if col[r] not in header]
    if missing:
        raise UserError(f"manifest: {path} lacks column(s) {', '.join(missing)}; it has {', '.join(header)}")
    label_key = col["label"]
    mapped = {col[r] for r in ROLES} - {label_key}

    def cell(row, role):
        value = (row.get(col[role]) or "").strip()
        return value or None

    def media(row, role):
        value = cell(row, role)
        if value is None:
            return None
        p = Path(value)
        return str((p if p.is_absolute() else path.parent / p).resolve())

    utterances, seen = [], set()
    for n, row in enumerate(rows, start=2):
        unusable = {}
        for key, value in row.items():
            where = _bad_utf8(value) if key is not None and isinstance(value, str) else None
            if where is None:
                continue
            if key != col["text"]:  # ids, labels, paths: nothing sensible to do with a broken one
                raise UserError(f"manifest: {path} line {n}, column {key}: not valid UTF-8 ({where}); "
                                f"save the CSV as UTF-8")
            unusable["text"] = f"transcript is not valid UTF-8 ({where}; {path.name} line {n})"
            row[key] = ""  # no text for this utterance; the failure says why
        uid = cell(row, "id")
        if uid is None or uid in seen:
            raise UserError(f"manifest: {path} line {n}: {'empty' if uid is None else 'duplicate'} id {uid or ''}")
        seen.add(uid)
        split = cell(row, "split")
        if split is not None and split.lower() not in SPLITS:
            raise UserError(f"manifest: {path} line {n}: split must be train, dev or test, got {split!r}")
        labels = {k: v.strip() for k, v in row.items() if k not in mapped and k != label_key and k and v and v.strip()}
        label = cell(row, "label")
        try:
            if label is not None:
                labels[label_key] = float(label) if task == "regression" else label
            start = float(cell(row, "start")) if cell(row, "start") else None
            end = float(cell(row, "end")) if cell(row, "end") else None
        except ValueError as e:
            raise UserError(f"manifest: {path} line {n}: {e}") from None
        utterances.append(Utterance(
            id=uid, speaker=cell(row, "speaker"), dialogue=cell(row, "dialogue"), text=cell(row, "text"),
            audio=media(row, "audio"), video=media(row, "video"), start=start, end=end,
            split=SPLITS[split.lower()] if split is not None and label is not None else None, labels=labels,
            unusable=unusable))

    found = sorted({u.labels[label_key] for u in utterances if label_key in u.labels}, key=str)
    if task == "classification":
        order = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c) for c in classes or found]
        unknown_labels = sorted(set(found) - set(order))
        if unknown_labels:
            raise UserError(f"manifest: label(s) {', '.join(unknown_labels)} are not in classes {order}")
    elif classes:
        raise UserError("manifest: classes apply to task=classification only")
    else:
        order = []
    return Corpus(name=str(name), utterances=utterances,
                  protocol=Protocol(name=protocol or f"{name}-{label_key}", label=label_key, task=task, classes=order))


def _bad_utf8(value: str) -> str | None:
    """Where a cell read with errors="surrogateescape" holds a byte that is not UTF-8, e.g.
    "byte 0xe9 at character 12"; None when it is all valid."""
    for i, ch in enumerate(value):
        if "\udc80" <= ch <= "\udcff":
            return f"byte 0x{ord(ch) - 0xdc00:02x} at character {i + 1}"
    return None
