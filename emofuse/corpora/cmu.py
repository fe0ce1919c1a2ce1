"""CMU-MOSI (Zadeh et al. 2016) and CMU-MOSEI (Zadeh et al. 2018): opinion segments of YouTube
monologues, sentiment in [-3, 3] (MOSEI also six emotion intensities in [0, 3]).

One reader for both; `name` ("mosi" | "mosei") says which. Labels come from either
  - an MMSA-style `label.csv` (columns video_id, clip_id, text, label[, label_T, label_A, label_V],
    annotation, mode; or id, text, label, mode as in ../shared/data/mosi), or
  - the SDK's label file read directly with h5py, no mmsdk needed: `CMU_MOSI_Opinion_Labels.csd` /
    `CMU_MOSEI_Labels.csd`. A .csd is HDF5: <top>/data/<video>/features (n, dims) and
    <top>/data/<video>/intervals (n, 2) seconds, one row per segment.
Transcripts (when label.csv has none): MOSI `Transcript/Segmented/<video>.annotprocessed`
("<seg>_DELIM_<text>" lines), MOSEI `Transcript/Segmented/Combined/<video>.txt`
("<video>___<seg>___<start>___<end>___<text>" lines), else the words of
`CMU_M*_TimestampedWords.csd` inside the segment's interval.
Media, looked for under <root> and <root>/Raw (the first that exists wins):
  segmented  Audio/WAV_16000/Segmented/<video>_<seg>.wav, Video/Segmented/<video>_<seg>.mp4 (MOSI),
             Videos/Segmented/Combined/<video>_<seg>.mp4 (MOSEI), <video>/<seg>.mp4 (MMSA's Raw/)
  full       Audio/WAV_16000/Full/<video>.wav, Video/Full/<video>.mp4 (MOSI),
             Audio/Full/WAV_16000/<video>.wav, Videos/Full/Combined/<video>.mp4 (MOSEI)
A segment with any segmented file uses those (whole files); otherwise, when its interval is
known, the full recordings are cut at start/end. Splits: the standard folds of the
CMU-MultimodalSDK, carried in emofuse/corpora/folds/ (video ids; valid -> dev).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from emofuse.corpora.base import Corpus, Protocol, Utterance
from emofuse.errors import UserError

FOLDS_DIR = Path(__file__).parent / "folds"
LABEL_CSD = {"mosi": "CMU_MOSI_Opinion_Labels.csd", "mosei": "CMU_MOSEI_Labels.csd"}
WORDS_CSD = {"mosi": "CMU_MOSI_TimestampedWords.csd", "mosei": "CMU_MOSEI_TimestampedWords.csd"}
# Column order of CMU_MOSEI_Labels.csd, used when the file does not name its dimensions.
MOSEI_DIMS = ["sentiment", "happy", "sad", "anger", "surprise", "disgust", "fear"]
SPLIT_NAMES = {"train": "train", "valid": "dev", "dev": "dev", "test": "test"}

SEGMENTED_AUDIO = ["Audio/WAV_16000/Segmented/{v}_{s}.wav"]
SEGMENTED_VIDEO = ["Video/Segmented/{v}_{s}.mp4", "Videos/Segmented/Combined/{v}_{s}.mp4", "{v}/{s}.mp4"]
FULL_AUDIO = ["Audio/WAV_16000/Full/{v}.wav", "Audio/Full/WAV_16000/{v}.wav"]
FULL_VIDEO = ["Video/Full/{v}.mp4", "Videos/Full/Combined/{v}.mp4"]


def standard_folds(name: str) -> dict[str, str]:
    """video id -> train | dev | test, from the packaged CMU-MultimodalSDK fold lists."""
    data = json.loads((FOLDS_DIR / f"cmu_{name}_standard_folds.json").read_text())
    return {video: SPLIT_NAMES[fold] for fold, videos in data["folds"].items() for video in videos}


def load(root: Path, protocol: str = "", name: str = "mosi", labels: str = "", splits: str = "standard",
         **unknown) -> Corpus:
    """name: mosi | mosei. labels: path of label.csv or the labels .csd (default: found in root).
    splits: "standard" (the SDK folds) or "csv" (label.csv's `mode` column)."""
    if unknown:
        raise UserError(f"{name}: unknown option(s) {', '.join(sorted(unknown))} (available: labels, splits)")
    if name not in LABEL_CSD:
        raise UserError(f"CMU reader: name must be mosi or mosei, got {name!r}")
    accepted = {"", "sentiment", "regression", "sentiment-regression", f"{name}-sentiment-regression"}
    emotions = name == "mosei" and protocol in ("emotions", "emotions-multilabel", "mosei-emotions-multilabel")
    if protocol not in accepted and not emotions:
        available = "sentiment-regression" + (", emotions-multilabel" if name == "mosei" else "")
        raise UserError(f"{name}: unknown protocol {protocol!r} (available: {available})")
    if splits not in ("standard", "csv"):
        raise UserError(f"{name}: splits must be 'standard' or 'csv', got {splits!r}")
    root = Path(root)
    bases = [b for b in (root, root / "Raw") if b.is_dir()]

    label_path = _find_labels(root, name, labels)
    if label_path.suffix == ".csv":
        segments = _segments_from_csv(label_path)
        transcripts = _transcripts(bases, {s["video"] for s in segments})
        for s in segments:
            s["start"], s["end"], text = transcripts.get(s["video"], {}).get(s["seg"], (None, None, None))
            s["text"] = s["text"] or text
    else:
        segments = _segments_from_csd(label_path, bases, root, name)

    folds = standard_folds(name)
    if splits == "csv" and any(s.get("mode") is None for s in segments):
        raise UserError(f"{name}: splits=csv needs a `mode` column in {label_path}")
    media = _Media(bases)
    utterances = []
    for s in segments:
        video, seg = s["video"], s["seg"]
        split = SPLIT_NAMES.get(s.get("mode") or "") if splits == "csv" else folds.get(video)
        audio, video_file, start, end = media.find(video, seg, s["start"], s["end"])
        utterances.append(Utterance(
            id=f"{video}_{seg}", speaker=video, dialogue=video, text=s["text"], audio=audio, video=video_file,
            start=start, end=end, split=split, labels=s["labels"]))
    if emotions:
        # The six emotion intensities in [0, 3]; the usual multi-label reading: present when > 0.
        for u in utterances:
            if all(e in u.labels for e in MOSEI_DIMS[1:]):
                u.labels["emotions"] = [e for e in MOSEI_DIMS[1:] if u.labels[e] > 0]
        return Corpus(name=name, utterances=utterances,
                      protocol=Protocol(name=f"{name}-emotions-multilabel", label="emotions", task="multilabel",
                                        classes=list(MOSEI_DIMS[1:])))
    return Corpus(name=name, utterances=utterances,
                  protocol=Protocol(name=f"{name}-sentiment-regression", label="sentiment", task="regression"))


# --------------------------------------------------------------------------------------- labels


def _find_labels(root: Path, name: str, labels: str) -> Path:
    if labels:
        path = Path(labels) if Path(labels).is_absolute() else root / labels
        if not path.is_file() or path.suffix not in (".csv", ".csd"):
            raise UserError(f"{name}: labels={labels!r}: expected a label.csv or .csd file at {path}")
        return path
    for path in (root / "label.csv", root / LABEL_CSD[name]):
        if path.is_file():
            return path
    raise UserError(f"{name}: expected label.csv (MMSA) or {LABEL_CSD[name]} (CMU-MultimodalSDK) in {root}")


def _segments_from_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    if "label" not in columns or not ({"id"} <= columns or {"video_id", "clip_id"} <= columns):
        raise UserError(f"{path}: expected columns video_id, clip_id (or id), text, label[, mode]; "
                        f"found {', '.join(sorted(columns))}")
    segments = []
    for n, row in enumerate(rows, start=2):
        if "video_id" in row:
            video, seg = row["video_id"].strip(), row["clip_id"].strip()
        else:
            video, _, seg = row["id"].strip().rpartition("_")  # video ids may hold "_" themselves
        try:
            labels = {"sentiment": float(row["label"])}
            for col, key in (("label_T", "sentiment_text"), ("label_A", "sentiment_audio"), ("label_V", "sentiment_video")):
                if row.get(col, "").strip():
                    labels[key] = float(row[col])
        except ValueError as e:
            raise UserError(f"{path} line {n}: {e}") from None
        if row.get("annotation", "").strip():
            labels["annotation"] = row["annotation"].strip()
        segments.append({"video": video, "seg": seg, "text": (row.get("text") or "").strip() or None,
                         "labels": labels, "mode": (row.get("mode") or "").strip() or None})
    return segments


def _read_csd(path: Path, videos=None) -> tuple[dict, list[str] | None]:
    """{video: (features (n, dims), intervals (n, 2))} (of `videos`, default all) and the dimension
    names if the file has them."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"cannot read {path} as a .csd (HDF5) file: {e}") from None
    with f:
        if len(f.keys()) != 1 or "data" not in f[next(iter(f.keys()))]:
            raise UserError(f"{path}: expected one top group holding data/<video>/features and intervals")
        top = f[next(iter(f.keys()))]
        data = {v: (g["features"][()], g["intervals"][()]) for v, g in top["data"].items()
                if videos is None or v in videos}
        dims = None
        meta = top.get("metadata")
        if meta is not None and "dimension names" in meta:
            value = meta["dimension names"][()]
            value = value[0] if getattr(value, "shape", ()) else value
            try:
                dims = [str(d).lower() for d in json.loads(value.decode() if isinstance(value, bytes) else value)]
            except (ValueError, TypeError):
                dims = None
    return data, dims


def _segments_from_csd(path: Path, bases: list[Path], root: Path, name: str) -> list[dict]:
    data, dims = _read_csd(path)
    if name == "mosei":
        dims = dims or MOSEI_DIMS
    transcripts = _transcripts(bases, data)
    untranscribed = {v for v in data if v not in transcripts}
    words = _words(root / WORDS_CSD[name], untranscribed) if untranscribed else {}
    segments = []
    for video, (features, intervals) in data.items():
        timed = transcripts.get(video, {})
        order = sorted(range(len(intervals)), key=lambda i: float(intervals[i][0]))
        for rank, i in enumerate(order):
            start, end = float(intervals[i][0]), float(intervals[i][1])
            # Segment id: the transcript's own id when its times match (MOSEI); otherwise the
            # segment's place in time within its video, from 1 for MOSI (as its segment files are
            # numbered) and from 0 for MOSEI.
            seg = next((k for k, (s0, s1, _) in timed.items()
                        if s0 is not None and abs(s0 - start) < 1e-3 and abs(s1 - end) < 1e-3), None)
            if seg is None:
                seg = str(rank + 1 if name == "mosi" else rank)
            text = timed[seg][2] if seg in timed else _words_in(words.get(video), start, end)
            values = [float(x) for x in features[i]]
            labels = {"sentiment": round(values[0], 6)}
            if dims and len(dims) == len(values):
                labels.update({d: round(x, 6) for d, x in zip(dims[1:], values[1:])})
            segments.append({"video": video, "seg": seg, "text": text, "labels": labels,
                             "start": start, "end": end})
    return segments


# ---------------------------------------------------------------------------------- transcripts


def _transcripts(bases: list[Path], videos) -> dict[str, dict[str, tuple]]:
    """{video: {seg: (start, end, text)}}; start/end are None where the transcript has no times."""
    out = {}
    for video in videos:
        for base in bases:
            mosi = base / "Transcript" / "Segmented" / f"{video}.annotprocessed"
            mosei = base / "Transcript" / "Segmented" / "Combined" / f"{video}.txt"
            if mosi.is_file():
                rows = {}
                for line in mosi.read_text(encoding="utf-8", errors="replace").splitlines():
                    seg, sep, text = line.partition("_DELIM_")
                    if sep:
                        rows[seg.strip()] = (None, None, " ".join(text.split()) or None)
                out[video] = rows
                break
            if mosei.is_file():
                rows = {}
                for line in mosei.read_text(encoding="utf-8", errors="replace").splitlines():
                    if not line.startswith(video + "___"):
                        continue
                    parts = line[len(video) + 3:].split("___", 3)  # the text may hold "___" itself
                    if len(parts) == 4:
                        rows[parts[0]] = (float(parts[1]), float(parts[2]), " ".join(parts[3].split()) or None)
                out[video] = rows
                break
    return out


def _words(path: Path, videos) -> dict:
    if not path.is_file():
        return {}
    data, _ = _read_csd(path, videos)
    return data


def _words_in(entry, start: float, end: float) -> str | None:
    if entry is None:
        return None
    features, intervals = entry
    words = []
    for (w,), (s0, s1) in zip(features, intervals):
        w = w.decode("utf-8", errors="replace") if isinstance(w, bytes) else str(w)
        if w != "sp" and s0 >= start - 1e-3 and s1 <= end + 1e-3:  # "sp" marks a pause
            words.append(w)
    return " ".join(words) or None


# ---------------------------------------------------------------------------------------- media


class _Media:
    """Finds a segment's files; only templates whose folder exists are tried."""

    def __init__(self, bases: list[Path]):
        def usable(templates):
            return [(b, t) for b in bases for t in templates if (b / t.split("{")[0]).is_dir()]

        self.seg_audio, self.seg_video = usable(SEGMENTED_AUDIO), usable(SEGMENTED_VIDEO)
        self.full_audio, self.full_video = usable(FULL_AUDIO), usable(FULL_VIDEO)

    @staticmethod
    def _first(options, video, seg) -> str | None:
        for base, template in options:
            path = base / template.format(v=video, s=seg)
            if path.is_file():
                return str(path.resolve())
        return None

    def find(self, video: str, seg: str, start, end):
        """(audio, video, start, end): segment files whole, else full recordings cut at the interval."""
        audio, video_file = self._first(self.seg_audio, video, seg), self._first(self.seg_video, video, seg)
        if audio or video_file:
            return audio, video_file, None, None
        if start is not None and end is not None:
            audio, video_file = self._first(self.full_audio, video, seg), self._first(self.full_video, video, seg)
            if audio or video_file:
                return audio, video_file, start, end
        return None, None, None, None
