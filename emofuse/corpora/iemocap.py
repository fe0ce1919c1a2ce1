"""IEMOCAP (Busso et al. 2008): five sessions of dyadic conversations, each between one female and
one male actor; categorical labels by majority vote and valence / arousal / dominance scores.

Layout (the `IEMOCAP_full_release` folder):

    Session{1..5}/dialog/EmoEvaluation/<dialog>.txt   "[start - end]\\t<utt>\\t<code>\\t[V, A, D]" lines
    Session{1..5}/dialog/transcriptions/<dialog>.txt  "<utt> [start-end]: text" lines
    Session{1..5}/sentences/wav/<dialog>/<utt>.wav    one utterance per file
    Session{1..5}/dialog/wav/<dialog>.wav             the whole dialogue
    Session{1..5}/dialog/avi/DivX/<dialog>.avi        the whole dialogue, both actors side by side

Utterance ids are the release's (Ses01F_impro01_F000: session 1, the female actor wears the
motion-capture markers in this dialogue, improvisation 1, the female actor's 1st turn).
Speaker = session + gender of the turn ("Ses01F"): ten actors.

Media (option `media`). Utterance.start/end cut the audio and the video alike, so both must be
on the dialogue's time line: "dialog" = dialogue avi for the face + dialogue wav (else the avi's own
sound track) for the voice, both cut at the EmoEvaluation times; "sentences" = the per-utterance
wav only, no video; "auto" (default) = "dialog" where the session has dialog/avi/DivX, else
"sentences".

Protocols ("<classes>[-paper]"):
  4class (default)  neutral, happy, sad, angry; merge_excited (default True) counts "exc" as happy,
                    else "exc" is left out. Published counts of the release's majority labels:
                    neu 1,708, hap 595, exc 1,041, sad 1,084, ang 1,103, fru 1,849, so 5,531
                    utterances with exc merged (4,490 without).
  6class            neutral, happy, sad, angry, excited, frustrated (7,380 utterances).
  Splits: leave-one-session-out, option fold = 1..5 (default 1) is the test session; dev is one
  actor of the next session (cyclically: fold 5 -> session 1), the female actor for odd folds and the
  male one for even folds (option dev_speaker, e.g. "Ses02M", to choose); the other 7 actors train.
  So test and dev are both speaker-independent and never share a session's recordings with test.
  "-binary": the same utterances scored as the paper trained them, one binary head per emotion
  (is it neutral? happy? sad? angry?), each a 2-way softmax with cross-entropy; the table gives
  per-emotion binary accuracy and weighted F1 (task "multilabel" with one-hot labels).
  "-paper" (or just "paper"): sessions 1-4 train, session 5 test, as in the SSE-FT paper; dev is
  every 10th dialogue of sessions 1-4 (whole dialogues, sorted by name): validation is
  speaker-dependent, the test speaker-independent, and validation never touches session 5 (the
  original code validated on its test set).
Utterances whose label is outside the protocol's classes (xxx, oth, fea, sur, dis, and fru/exc
in 4class) are left out, or kept without a split with keep_unlabelled=True.

labels: emotion (the majority label's name, "no_agreement" for xxx), valence, arousal, dominance,
session, gender, emotion4 / emotion6 where the utterance belongs to those classes, and face_side.
"""

from __future__ import annotations

import re
from pathlib import Path

from emofuse.corpora.base import Corpus, Protocol, Utterance
from emofuse.errors import UserError

NAMES = {"neu": "neutral", "hap": "happy", "sad": "sad", "ang": "angry", "exc": "excited", "fru": "frustrated",
         "fea": "fear", "sur": "surprised", "dis": "disgusted", "oth": "other", "xxx": "no_agreement"}
CLASSES = {"4class": ["neutral", "happy", "sad", "angry"],
           "6class": ["neutral", "happy", "sad", "angry", "excited", "frustrated"]}
SESSIONS = (1, 2, 3, 4, 5)

EVAL_LINE = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(Ses\w+)\s+(\w+)\s+\[\s*([\d.]+),\s*([\d.]+),\s*([\d.]+)\s*\]")
TRANSCRIPT_LINE = re.compile(r"^(Ses\w+)\s+\[[^\]]*\]:\s?(.*)$")

# Which half of the two-actor frame shows the speaker. In every dialogue one actor wears the
# motion-capture markers (the letter after the session number in the dialogue name, Ses01F_...).
# The public preprocessing scripts we found all put that actor on the LEFT half and the other on
# the right: IoannisKansizoglou/Iemocap-preprocess (extractionmapCreator.py, find_speaker: dialogue
# name[5] == 'F' -> female left, male right; 'M' -> male left), a later copy of that rule
# (IEMOCAPDataMap.find_speaker), and an EmoBox-based clip cutter (x_offset 0 for the marker
# wearer's gender, 360 for the other, on the 720x480 frame). We have not checked it on the videos
# ourselves; side_rule="lead-right" flips it, "none" leaves face_side out (face tracker decides).
SIDE_RULES = ("lead-left", "lead-right", "none")


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UserError(f"IEMOCAP: option {name} must be true or false, got {value!r}")


def _parse_protocol(protocol: str) -> tuple[str, bool, bool]:
    classes, paper, binary = "4class", False, False
    for token in (protocol or "").split("-"):
        if token in CLASSES:
            classes = token
        elif token == "paper":
            paper = True
        elif token == "binary":
            binary = True
        elif token not in ("", "loso"):
            raise UserError(f"IEMOCAP: unknown protocol {protocol!r} (available: 4class, 6class, "
                            f"with -binary and/or -paper, e.g. 4class-binary-paper)")
    return classes, paper, binary


def _find_root(root: Path) -> Path:
    for base in (root, root / "IEMOCAP_full_release"):
        if any((base / f"Session{s}" / "dialog" / "EmoEvaluation").is_dir() for s in SESSIONS):
            return base
    raise UserError(f"IEMOCAP: expected Session1..Session5/dialog/EmoEvaluation/*.txt in {root} "
                    f"(the IEMOCAP_full_release folder)")


def face_side(utterance_id: str, rule: str) -> str | None:
    """'left' | 'right' for the speaker of an utterance under `rule` (see SIDE_RULES)."""
    if rule == "none":
        return None
    lead = utterance_id[5]  # Ses01F_...: the actor wearing markers
    speaker = utterance_id.rsplit("_", 1)[1][0]  # ..._F000 / ..._M012: whose turn it is
    is_lead = speaker == lead
    return "left" if is_lead == (rule == "lead-left") else "right"


def folds(root: Path, protocol: str = "") -> list[int]:
    """Leave-one-session-out: the test session of each fold (the paper protocol has a single split)."""
    return [] if "paper" in protocol else list(SESSIONS)


def load(root: Path, protocol: str = "", fold=None, merge_excited=None, dev_speaker: str = "",
         side_rule: str = "lead-left", media: str = "auto", keep_unlabelled=False, **unknown) -> Corpus:
    if unknown:
        raise UserError(f"IEMOCAP: unknown option(s) {', '.join(sorted(unknown))} (available: fold, "
                        f"merge_excited, dev_speaker, side_rule, media, keep_unlabelled)")
    class_set, paper, binary = _parse_protocol(protocol)
    if merge_excited is None:
        merge_excited = class_set == "4class"
    merge_excited = _bool(merge_excited, "merge_excited")
    if merge_excited and class_set == "6class":
        raise UserError("IEMOCAP: merge_excited applies to 4class only (6class keeps excited as a class)")
    keep_unlabelled = _bool(keep_unlabelled, "keep_unlabelled")
    if side_rule not in SIDE_RULES:
        raise UserError(f"IEMOCAP: side_rule must be one of {', '.join(SIDE_RULES)}, got {side_rule!r}")
    if media not in ("auto", "dialog", "sentences"):
        raise UserError(f"IEMOCAP: media must be auto, dialog or sentences, got {media!r}")
    if fold is not None:
        try:
            fold = int(fold)  # "3", "03" or 3
        except (TypeError, ValueError):
            fold = 0
        if fold not in SESSIONS:
            raise UserError(f"IEMOCAP: fold must be a session number 1-5, got {fold!r}")
    root = _find_root(Path(root))

    rows = _read_sessions(root, media)
    if not rows:
        raise UserError(f"IEMOCAP: no labelled utterances found in {root}/Session*/dialog/EmoEvaluation/*.txt")

    # Protocol labels, then the splits.
    classes = CLASSES[class_set]
    label_key = "emotion4" if class_set == "4class" else "emotion6"
    for u in rows:
        emotion = u.labels["emotion"]
        if emotion in CLASSES["4class"] or (merge_excited and emotion == "excited"):
            u.labels["emotion4"] = "happy" if emotion == "excited" else emotion
        if emotion in CLASSES["6class"]:
            u.labels["emotion6"] = emotion
        side = face_side(u.id, side_rule)
        if side:
            u.labels["face_side"] = side

    if paper:
        if fold is not None or dev_speaker:
            raise UserError("IEMOCAP: the paper protocol has fixed splits (no fold or dev_speaker)")
        test_session = 5
        dialogues = sorted({u.dialogue for u in rows if u.labels["session"] != test_session})
        dev_dialogues = set(dialogues[::10])
        in_dev = {u.id for u in rows if u.dialogue in dev_dialogues}
        name = f"iemocap-{class_set}{'-exc2hap' if merge_excited else ''}{'-binary' if binary else ''}-paper"
    else:
        test_session = 1 if fold is None else fold
        following = test_session % 5 + 1
        dev_speaker = dev_speaker or f"Ses{following:02d}{'F' if test_session % 2 else 'M'}"
        if not re.fullmatch(r"Ses0[1-5][FM]", dev_speaker) or int(dev_speaker[3:5]) == test_session:
            raise UserError(f"IEMOCAP: dev_speaker must be an actor outside the test session {test_session} "
                            f"(e.g. Ses{following:02d}F), got {dev_speaker!r}")
        in_dev = {u.id for u in rows if u.speaker == dev_speaker}
        name = f"iemocap-{class_set}{'-exc2hap' if merge_excited else ''}{'-binary' if binary else ''}-fold{test_session}"

    utterances = []
    for u in rows:
        if label_key in u.labels:
            u.split = "test" if u.labels["session"] == test_session else "dev" if u.id in in_dev else "train"
        elif not keep_unlabelled:
            continue
        utterances.append(u)
    if not any(u.split == "test" for u in utterances):
        raise UserError(f"IEMOCAP: no labelled utterance in the test session under {root} (is its Session folder there?)")
    return Corpus(name="iemocap", utterances=utterances,
                  protocol=Protocol(name=name, label=label_key, classes=list(classes),
                                    task="multilabel" if binary else "classification"))


def _read_sessions(root: Path, media: str) -> list[Utterance]:
    rows = []
    for session in SESSIONS:
        sdir = root / f"Session{session}"
        eval_dir = sdir / "dialog" / "EmoEvaluation"
        if not eval_dir.is_dir():
            continue
        use_dialog = media == "dialog" or (media == "auto" and (sdir / "dialog" / "avi" / "DivX").is_dir())
        for eval_file in sorted(eval_dir.glob("Ses*.txt")):  # skips macOS "._" files and subfolders
            dialogue = eval_file.stem
            texts = _read_transcript(sdir / "dialog" / "transcriptions" / f"{dialogue}.txt")
            avi = sdir / "dialog" / "avi" / "DivX" / f"{dialogue}.avi"
            dialog_wav = sdir / "dialog" / "wav" / f"{dialogue}.wav"
            for line in eval_file.read_text(encoding="utf-8", errors="replace").splitlines():
                m = EVAL_LINE.match(line)
                if not m:
                    continue
                start, end, utt, code = float(m[1]), float(m[2]), m[3], m[4]
                if code not in NAMES:
                    raise UserError(f"IEMOCAP: {eval_file}: unknown emotion code {code!r} for {utt}")
                gender = utt.rsplit("_", 1)[1][0]
                audio = video = None
                if use_dialog:
                    video = str(avi.resolve()) if avi.is_file() else None
                    audio = str(dialog_wav.resolve()) if dialog_wav.is_file() else video
                else:
                    wav = sdir / "sentences" / "wav" / dialogue / f"{utt}.wav"
                    audio = str(wav.resolve()) if wav.is_file() else None
                timed = use_dialog and (audio or video)
                rows.append(Utterance(
                    id=utt, speaker=f"Ses{session:02d}{gender}", dialogue=dialogue, text=texts.get(utt),
                    audio=audio, video=video, start=start if timed else None, end=end if timed else None,
                    labels={"emotion": NAMES[code], "valence": float(m[5]), "arousal": float(m[6]),
                            "dominance": float(m[7]), "session": session, "gender": gender}))
    return rows


def _read_transcript(path: Path) -> dict[str, str]:
    """Transcripts verbatim (whitespace normalised), including markers such as [LAUGHTER]."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = TRANSCRIPT_LINE.match(line.strip())
        if m:
            out[m[1]] = " ".join(m[2].split()) or None
    return out
