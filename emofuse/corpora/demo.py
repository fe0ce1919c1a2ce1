"""A generated demo corpus: real WAV + MP4 files whose emotion cues are partly clear, partly ambiguous.

Why generated: it lets every stage (extract -> cache -> fuse -> evaluate) run offline on real media
files, and the answer is known. Why partly ambiguous: a corpus where every modality is clear would
not show what fusion is for. Here each sample has one or two (rarely three) *clear* modalities that
show the true class strongly; the others are *ambiguous*:
  - audio / video express a random class at low intensity (close to neutral),
  - text is a generic sentence shared by all classes ("We went to the office on Tuesday.").
So one modality alone is right about P(clear) + P(ambiguous) / 4 ~ 60-65% of the time, while the
three together nearly always contain a clear cue: a fusion has to learn which modality to trust.
The per-modality clarity is written to metadata.csv (clear_audio, clear_text, clear_video) for
analysis; it is not a label.
Measured on "full" (seeds 0 and 1; speaker-disjoint test; eGeMAPS / mean-pooled MiniLM / dlib
landmarks + descriptor; logistic regression): audio 0.58 / 0.65, text 0.63 / 0.61, video 0.70 / 0.66;
all three concatenated (gradient boosting or MLP) 0.97 / 0.97. On the samples where a modality is
clear, it alone is right 0.91-1.00 of the time. dlib finds the face in 100% of the frames.

How one sample is made (`_plan` draws the class, clarity, expressed classes, intensities and text of
every sample up front from `seed`; `_render` turns one planned row into a WAV and an MP4 with its own
per-utterance random generator, so the files do not depend on the order or the process they are
rendered in):
  audio  source-filter synthesis at 16 kHz: a harmonic voice source with a spectral tilt, at a pitch
         contour (level, slope, accents, jitter), shimmer and breath noise, cut into syllables that
         are shaped by vowel formants (cascade resonators, as in Klatt's synthesiser); prosody moves
         from NEUTRAL towards the expressed class by the expression intensity.
  text   a sentence from class templates (clear) or generic templates (ambiguous), with slot words.
  video  the astronaut photo shipped with scikit-image (Eileen Collins), her face cropped and warped
         by smooth displacement fields around dlib's 68 landmarks (mouth corners, lips, brows,
         eyelids), the expression rising over the first half second; plus per-speaker framing,
         brightness and colour, small head motion and lip movement with the syllables.
Speakers differ in base pitch, formant scale, loudness and framing, and splits are by speaker.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np

from emofuse.corpora.base import Corpus, Protocol, Utterance
from emofuse.errors import UserError

CLASSES = ["neutral", "happy", "sad", "angry"]
VERSION = 1  # bump when the generator changes, so an old corpus on disk is regenerated

SR = 16000  # audio sample rate
FPS = 12  # video frame rate
FRAME = 192  # video frames are FRAME x FRAME RGB

# Speakers are listed from the lowest, largest voice to the highest, smallest one, with their split:
# the extremes train, so dev and test voices lie inside the range the models were trained on.
# Utterances per speaker are a multiple of 4: classes are balanced per speaker.
SIZES = {
    "small": {"splits": ["train", "test", "dev", "train"], "per_speaker": 12},
    "full": {"splits": ["train", "test", "train", "dev", "train", "train", "test", "train"], "per_speaker": 60},
}

# How many modalities are clear in a sample, and how often. Never 0: every sample is decidable.
N_CLEAR_P = {1: 0.50, 2: 0.45, 3: 0.05}
CLEAR_INTENSITY = (0.7, 1.0)
AMBIGUOUS_INTENSITY = (0.0, 0.3)


# ----------------------------------------------------------------------------------------- text

SLOTS = {
    "thing": ["the new job", "the trip", "the results", "my sister's visit", "the house", "the weekend",
              "the project", "the news", "the concert", "the exam", "the move", "the wedding"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "place": ["the office", "the station", "the library", "the market", "the school", "the bank", "the garage"],
    "time": ["nine", "ten", "eleven", "two", "three", "four"],
    "person": ["my brother", "the manager", "our neighbour", "the teacher", "my friend", "the driver"],
}

TEMPLATES = {
    "neutral": [
        "I feel fine about {thing}, nothing special.",
        "It's okay, I don't have strong feelings about {thing}.",
        "I'm calm, it is just a normal day.",
        "Sure, that works for me, no problem either way.",
        "Honestly {thing} doesn't bother me, it's fine.",
        "I'm neither happy nor upset about {thing}.",
    ],
    "happy": [
        "I am so happy about {thing}!",
        "This is wonderful news, I love it!",
        "We did it! I can't stop smiling.",
        "What a great day, {thing} went perfectly.",
        "I'm really excited about {thing}!",
        "That made me so glad, thank you so much!",
    ],
    "sad": [
        "I feel so sad about {thing}.",
        "I miss them so much, it really hurts.",
        "Nothing is going right, I just want to cry.",
        "It's over, and I feel empty and alone.",
        "I'm heartbroken about {thing}.",
        "I lost everything, I feel so miserable.",
    ],
    "angry": [
        "I am furious about {thing}!",
        "This is unacceptable, I'm so angry!",
        "Stop lying to me, I'm sick of it!",
        "How dare {person} do this to me?",
        "I hate this, {thing} is a total disgrace!",
        "Get out, I've had enough of your excuses!",
    ],
}

# Shared by all classes: a sample with generic text says nothing about its emotion.
GENERIC_TEMPLATES = [
    "We went to {place} on {day}.",
    "The meeting is at {time} in room {room}.",
    "I took the bus to {place} this morning.",
    "{person} said the report is on the table.",
    "They moved the boxes to {place} on {day}.",
    "The train leaves at {time} from platform {room}.",
    "I talked to {person} about {thing}.",
    "Can you tell me where {place} is?",
]


def _fill(template: str, rng: np.random.Generator) -> str:
    words = {k: v[rng.integers(len(v))] for k, v in SLOTS.items()}
    words["room"] = str(rng.integers(2, 40))
    text = template.format(**words)
    return text[0].upper() + text[1:]


# ---------------------------------------------------------------------------------------- audio

# Prosody at full intensity. An expression of class c at intensity i uses NEUTRAL + i * (c - NEUTRAL).
#   level   mean pitch, semitones above the speaker's base
#   slope   pitch change from start to end of the utterance, semitones (rising > 0, falling < 0)
#   accent  pitch excursion on stressed syllables, semitones; width = its duration, in syllables
#   rate    syllables per second
#   gain    loudness, dB; stress = extra loudness of stressed syllables, dB
#   tilt    spectral tilt of the voice source, dB per octave (flatter = tenser, louder voice)
#   jitter  / shimmer: random cycle-to-cycle variation of pitch / amplitude (relative)
#   breath  aspiration noise relative to the voiced source
PROSODY = {
    "neutral": dict(level=0.0, slope=-1.0, accent=1.0, width=0.45, rate=4.2, gain=0.0, stress=3.0, tilt=-9.0,
                    jitter=0.004, shimmer=0.04, breath=0.03),
    "happy": dict(level=6.0, slope=5.0, accent=3.5, width=0.5, rate=5.4, gain=3.0, stress=4.0, tilt=-7.0,
                  jitter=0.006, shimmer=0.05, breath=0.03),
    "sad": dict(level=-3.5, slope=-4.0, accent=0.3, width=0.5, rate=2.7, gain=-9.0, stress=1.0, tilt=-14.0,
                jitter=0.014, shimmer=0.12, breath=0.12),
    "angry": dict(level=3.0, slope=-1.5, accent=6.0, width=0.12, rate=5.8, gain=9.0, stress=7.0, tilt=-4.5,
                  jitter=0.014, shimmer=0.09, breath=0.03),
}

# Formant frequencies (Hz) of a few vowels of an adult voice; bandwidths grow with frequency.
VOWELS = {"a": (730, 1090, 2440), "i": (270, 2290, 3010), "u": (300, 870, 2240),
          "e": (530, 1840, 2480), "o": (570, 840, 2410)}
BANDWIDTHS = (80, 100, 150)


def _prosody(cls: str, intensity: float) -> dict:
    base, target = PROSODY["neutral"], PROSODY[cls]
    return {k: base[k] + intensity * (target[k] - base[k]) for k in base}


def _slow_noise(rng: np.random.Generator, n: int, rate_hz: float) -> np.ndarray:
    """Random values at `rate_hz`, linearly interpolated to n samples (about one value per pitch period)."""
    knots = rng.standard_normal(int(n * rate_hz / SR) + 2)
    return np.interp(np.arange(n) * rate_hz / SR, np.arange(len(knots)), knots)


def _formant_filter(x: np.ndarray, formants) -> np.ndarray:
    """Cascade of second-order resonators, each with unit gain at 0 Hz (Klatt 1980)."""
    from scipy.signal import sosfilt

    sos = []
    for f, bw in zip(formants, BANDWIDTHS):
        r = np.exp(-np.pi * bw / SR)
        a1, a2 = -2 * r * np.cos(2 * np.pi * f / SR), r * r
        sos.append([1 + a1 + a2, 0, 0, 1, a1, a2])
    return sosfilt(np.array(sos), x)


def _syllables(rng: np.random.Generator, duration: float, rate: float):
    """Syllable (start, end) times: speech fills the clip between short silences at both ends."""
    lead, trail = rng.uniform(0.08, 0.18), rng.uniform(0.08, 0.18)
    span = duration - lead - trail
    n = max(3, int(round(span * rate)))
    lengths = rng.uniform(0.75, 1.25, n)
    edges = lead + span * np.concatenate([[0], np.cumsum(lengths)]) / lengths.sum()
    return list(zip(edges[:-1], edges[1:]))


def synth_audio(rng: np.random.Generator, duration: float, cls: str, intensity: float, speaker: dict):
    """Speech-like audio expressing `cls` at `intensity`; returns (float32 waveform, syllable times)."""
    p = _prosody(cls, intensity)
    n = int(round(duration * SR))
    t = np.arange(n) / SR
    syl = _syllables(rng, duration, p["rate"])

    # Pitch contour in semitones: level + linear slope + an accent on stressed syllables.
    st = p["level"] + p["slope"] * (t / duration - 0.5)
    stressed = rng.random(len(syl)) < 0.5
    stressed[rng.integers(len(syl))] = True  # at least one accent
    for (s0, s1), accent_here in zip(syl, stressed):
        if accent_here:
            centre = s0 + 0.3 * (s1 - s0)
            width = p["width"] * (s1 - s0)
            st += p["accent"] * rng.uniform(0.7, 1.0) * np.exp(-0.5 * ((t - centre) / width) ** 2)
    f0 = speaker["f0"] * 2 ** (st / 12) * (1 + p["jitter"] * _slow_noise(rng, n, 150.0))

    # Voice source: harmonics of f0 with a spectral tilt, up to 7 kHz (below Nyquist).
    # (phase wrapped to one cycle, so that float32 - 8x faster here - stays exact enough)
    phase = np.mod(2 * np.pi * np.cumsum(f0) / SR, 2 * np.pi).astype(np.float32)
    k = np.arange(1, int(7000 / f0.min()) + 1, dtype=np.float32)
    amps = 10 ** (p["tilt"] * np.log2(k) / 20)
    harmonics = np.sin(phase[:, None] * k[None, :]) * amps[None, :]
    harmonics[f0[:, None] * k[None, :] > 7000] = 0
    voiced = harmonics.sum(axis=1) * (1 + p["shimmer"] * _slow_noise(rng, n, 150.0))
    voiced /= np.sqrt(np.mean(voiced**2)) + 1e-9
    source = voiced + p["breath"] * 3 * rng.standard_normal(n)

    # Each syllable: a vowel (formants scaled by the speaker's vocal tract), a smooth envelope,
    # sometimes a fricative-like noise burst at its onset; stressed syllables are louder.
    out = np.zeros(n)
    for (s0, s1), accent_here in zip(syl, stressed):
        i0, i1 = int(s0 * SR), min(int(s1 * SR), n)
        formants = np.array(VOWELS["aeiou"[rng.integers(5)]]) * speaker["formant_scale"]
        seg = _formant_filter(source[i0:i1], formants)
        seg /= np.sqrt(np.mean(seg**2)) + 1e-9
        m = i1 - i0
        onset = int(m * rng.uniform(0.1, 0.25))  # consonant part: low, noisy
        env = np.zeros(m)
        env[onset:] = np.sin(np.pi * np.linspace(0, 1, m - onset)) ** 0.7
        seg *= env * 10 ** ((p["stress"] if accent_here else 0.0) / 20)
        if rng.random() < 0.5:
            burst = np.diff(rng.standard_normal(onset + 1)) * np.hanning(onset) * 0.12
            seg[:onset] += burst
        out[i0:i1] += seg

    gain = 10 ** ((p["gain"] + speaker["gain"]) / 20) * 0.03  # the loudest (angry) voices peak below 1
    out = out * gain + 1e-4 * rng.standard_normal(n)  # a faint noise floor: no digital silence
    return np.clip(out, -1, 1).astype(np.float32), syl


# ---------------------------------------------------------------------------------------- video

# Expression displacements at full intensity, in pixels of the 512x512 astronaut image (her face is
# about 90 px wide): (landmark index, dx, dy, sigma). The face is pulled around each landmark by a
# Gaussian-weighted displacement, so the warp stays smooth and the face stays a face.
EXPRESSIONS = {
    "neutral": [],
    "happy": [  # mouth corners up and out, a slightly open smile, cheeks push the lower eyelids up
        (48, -5, -6, 9), (54, 5, -6, 9), (57, 0, 2, 6),
        (41, 0, -1.5, 5), (40, 0, -1.5, 5), (46, 0, -1.5, 5), (47, 0, -1.5, 5),
    ],
    "sad": [  # mouth corners down, inner brows up and together, outer brows down
        (48, -1, 7, 9), (54, 1, 7, 9),
        (21, 1.5, -5, 7), (22, -1.5, -5, 7), (17, 0, 2, 6), (26, 0, 2, 6),
    ],
    "angry": [  # brows down and together, lids narrowed, lips pressed and corners pulled in
        (21, 4, 5, 8), (22, -4, 5, 8), (19, 1.5, 3, 7), (24, -1.5, 3, 7),
        (37, 0, 1.5, 4), (38, 0, 1.5, 4), (43, 0, 1.5, 4), (44, 0, 1.5, 4),
        (51, 0, 2, 5), (57, 0, -2.5, 5), (48, 2, 0, 6), (54, -2, 0, 6),
    ],
}
TALK = [(57, 0, 3, 7), (8, 0, 1.5, 12)]  # jaw and lower lip open with each syllable

CROP = 160  # side of the square around the face, in source pixels, that fills a frame


def _model_path(name: str) -> str:
    # face_recognition_models' own helper imports pkg_resources, gone from recent setuptools.
    spec = importlib.util.find_spec("face_recognition_models")
    return str(Path(spec.submodule_search_locations[0]) / "models" / name)


@lru_cache(maxsize=1)
def _face():
    """The astronaut photo, its 68 landmarks (found once with dlib) and one displacement field per expression."""
    import dlib
    from skimage.data import astronaut

    image = np.ascontiguousarray(astronaut())
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(_model_path("shape_predictor_68_face_landmarks.dat"))
    box = max(detector(image, 1), key=lambda r: r.width())  # the largest face: hers
    landmarks = np.array([[q.x, q.y] for q in predictor(image, box).parts()], dtype=np.float64)

    # Work on a 256 x 256 window around the face, large enough for any framing drawn below.
    centre = landmarks.mean(axis=0)
    x0 = int(np.clip(centre[0] - 128, 0, image.shape[1] - 256))
    y0 = int(np.clip(centre[1] - 128, 0, image.shape[0] - 256))
    window = np.ascontiguousarray(image[y0:y0 + 256, x0:x0 + 256]).astype(np.float32)
    points = landmarks - [x0, y0]
    gy, gx = np.mgrid[0:256, 0:256].astype(np.float32)

    def field(spec):
        # The displacement that moves each landmark by (dx, dy): a sum of Gaussian bumps.
        dx, dy = np.zeros_like(gx), np.zeros_like(gy)
        for idx, ddx, ddy, sigma in spec:
            w = np.exp(-((gx - points[idx, 0]) ** 2 + (gy - points[idx, 1]) ** 2) / (2 * sigma**2))
            dx += ddx * w
            dy += ddy * w
        return dx, dy

    fields = {name: field(spec) for name, spec in EXPRESSIONS.items()}
    fields["talk"] = field(TALK)
    face_centre = (landmarks[:, 0].min() + landmarks[:, 0].max()) / 2 - x0, points[:, 1].mean() + 4
    return window, gx, gy, fields, face_centre


def render_video(rng: np.random.Generator, duration: float, cls: str, intensity: float, speaker: dict,
                 syllables) -> list[np.ndarray]:
    """RGB uint8 frames of the face showing `cls` at `intensity`, moving a little."""
    import cv2

    window, gx, gy, fields, (cx, cy) = _face()
    n_frames = int(round(duration * FPS))
    expr_x, expr_y = fields[cls]
    talk_x, talk_y = fields["talk"]
    onset = rng.uniform(0.2, 0.6)  # seconds until the expression is fully there
    sway = rng.uniform(0, 2 * np.pi, 3)  # phases of the head motion
    frames = []
    for f in range(n_frames):
        t = f / FPS
        # Expression rises smoothly, then holds; lips open while a syllable is voiced.
        rise = np.clip(t / onset, 0, 1)
        a = intensity * rise * rise * (3 - 2 * rise)
        talk = max((np.sin(np.pi * (t - s0) / (s1 - s0)) for s0, s1 in syllables if s0 <= t < s1), default=0.0)
        # Backward map: the output pixel at q shows the source pixel at q - displacement(q).
        mx = (gx - a * expr_x - talk * talk_x).astype(np.float32)
        my = (gy - a * expr_y - talk * talk_y).astype(np.float32)
        face = cv2.remap(window, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

        # Framing: speaker's zoom / offset / roll plus a slow head sway; maps output -> window pixels.
        angle = np.deg2rad(speaker["roll"] + 1.5 * np.sin(2 * np.pi * 0.4 * t + sway[0]))
        scale = CROP / FRAME / speaker["zoom"]
        ox = cx + speaker["shift_x"] + 2.0 * np.sin(2 * np.pi * 0.3 * t + sway[1])
        oy = cy + speaker["shift_y"] + 1.5 * np.sin(2 * np.pi * 0.5 * t + sway[2])
        c, s = scale * np.cos(angle), scale * np.sin(angle)
        h = FRAME / 2
        m = np.array([[c, -s, ox - c * h + s * h], [s, c, oy - s * h - c * h]], dtype=np.float32)
        frame = cv2.warpAffine(face, m, (FRAME, FRAME), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REFLECT)
        frame = frame * (speaker["brightness"] * np.asarray(speaker["tint"], dtype=np.float32))
        frames.append(np.clip(frame + 0.5, 0, 255).astype(np.uint8))
    return frames


def write_mp4(path: Path, frames: list[np.ndarray], wav: np.ndarray | None = None) -> None:
    """H.264 video and, when given, the clip's speech as an AAC track: one file carries both, as
    the clips of MELD or a user's own recording do (`emofuse predict RUN clip.mp4` reads both)."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = FRAME, FRAME, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        stream.codec_context.thread_count = 1  # small frames: threads cost more than they give
        if wav is not None:  # every stream is added before the first packet is written
            audio = container.add_stream("aac", rate=SR)
            audio.layout = "mono"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush
        if wav is not None:
            block = 1024  # AAC frame size
            for i in range(0, len(wav), block):
                chunk = np.ascontiguousarray(wav[i : i + block], dtype=np.float32)[None]
                frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
                frame.sample_rate, frame.pts = SR, i
                container.mux(audio.encode(frame))
            container.mux(audio.encode())


# ------------------------------------------------------------------------------------- the plan


def _speakers(rng: np.random.Generator, size: str) -> list[dict]:
    splits = SIZES[size]["splits"]
    speakers = []
    for i, split in enumerate(splits):
        # One "voice size" from 0 (low pitch, long vocal tract) to 1 (high pitch, short vocal tract).
        voice = np.clip((i + rng.uniform(-0.3, 0.3)) / (len(splits) - 1), 0, 1)
        speakers.append({
            "name": f"spk{i + 1:02d}",
            "split": split,
            "f0": float(105 * (190 / 105) ** voice),  # base pitch, Hz
            "formant_scale": float(0.9 + 0.2 * voice + rng.uniform(-0.02, 0.02)),
            "gain": float(rng.uniform(-2, 2)),  # dB
            "zoom": float(rng.uniform(0.92, 1.08)),
            "shift_x": float(rng.uniform(-6, 6)),
            "shift_y": float(rng.uniform(-6, 6)),
            "roll": float(rng.uniform(-3, 3)),  # degrees
            "brightness": float(rng.uniform(0.8, 1.15)),
            "tint": [float(v) for v in rng.uniform(0.93, 1.07, 3)],
        })
    return speakers


def _plan(size: str, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw every sample's speaker, class, clarity, expressed classes, intensities and text."""
    rng = np.random.default_rng([seed, 1])
    speakers = _speakers(rng, size)
    per_speaker = SIZES[size]["per_speaker"]
    rows = []
    for spk in speakers:
        classes = rng.permutation(np.repeat(CLASSES, per_speaker // len(CLASSES)))
        for j, cls in enumerate(classes, start=1):
            n_clear = rng.choice(list(N_CLEAR_P), p=list(N_CLEAR_P.values()))
            clear = set(rng.choice(["audio", "text", "video"], size=n_clear, replace=False))
            row = {"id": f"{spk['name']}_{j:04d}", "speaker": spk["name"], "split": spk["split"],
                   "emotion": str(cls), "duration": round(float(rng.uniform(1.5, 2.5)), 3)}
            for m in ("audio", "video"):
                if m in clear:
                    row[f"{m}_class"], row[f"{m}_intensity"] = str(cls), rng.uniform(*CLEAR_INTENSITY)
                else:  # a weak hint of a random class, possibly the true one
                    row[f"{m}_class"] = CLASSES[rng.integers(len(CLASSES))]
                    row[f"{m}_intensity"] = rng.uniform(*AMBIGUOUS_INTENSITY)
                row[f"{m}_intensity"] = round(float(row[f"{m}_intensity"]), 3)
            templates = TEMPLATES[cls] if "text" in clear else GENERIC_TEMPLATES
            row["text"] = _fill(templates[rng.integers(len(templates))], rng)
            for m in ("audio", "text", "video"):
                row[f"clear_{m}"] = int(m in clear)
            rows.append(row)
    return speakers, rows


def _render(root: Path, row: dict, speaker: dict, seed: int, index: int) -> None:
    """Write one planned sample's WAV and MP4."""
    import soundfile as sf

    rng = np.random.default_rng([seed, 2, index])
    wav, syllables = synth_audio(rng, row["duration"], row["audio_class"], row["audio_intensity"], speaker)
    sf.write(root / "audio" / f"{row['id']}.wav", wav, SR, subtype="PCM_16")
    frames = render_video(rng, row["duration"], row["video_class"], row["video_intensity"], speaker, syllables)
    write_mp4(root / "video" / f"{row['id']}.mp4", frames, wav)


# -------------------------------------------------------------------------------------- public

COLUMNS = ["id", "speaker", "split", "emotion", "text", "audio", "video", "duration", "frames",
           "clear_audio", "clear_text", "clear_video",
           "audio_class", "audio_intensity", "video_class", "video_intensity"]


def generate(root: Path, size: str = "small", seed: int = 0, progress: bool = True) -> Path:
    """Write the demo corpus under root: audio/*.wav, video/*.mp4, metadata.csv, README.txt, demo.json.

    Idempotent: a corpus already there with the same size, seed and generator version is kept as is.
    """
    from tqdm import tqdm

    if size not in SIZES:
        raise UserError(f"demo corpus size must be one of {sorted(SIZES)}, got {size!r}")
    root = Path(root)
    stamp = {"version": VERSION, "size": size, "seed": int(seed)}
    done = root / "demo.json"
    if (root / "metadata.csv").exists() and done.exists():
        old = json.loads(done.read_text())
        if {k: old.get(k) for k in stamp} == stamp:
            return root
        # Another demo corpus: replace its media so no stale file survives.
        shutil.rmtree(root / "audio", ignore_errors=True)
        shutil.rmtree(root / "video", ignore_errors=True)
    done.unlink(missing_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "video").mkdir(parents=True, exist_ok=True)

    speakers, rows = _plan(size, seed)
    by_name = {s["name"]: s for s in speakers}
    # One process, about 0.1 s per utterance (measured: worker processes gained nothing on 2 cores).
    for i, row in enumerate(tqdm(rows, desc=f"demo corpus ({size})", unit="utt", disable=not progress)):
        _render(root, row, by_name[row["speaker"]], int(seed), i)

    # metadata last (through a temporary file), then the stamp: a crash never looks like a corpus.
    tmp = root / "metadata.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "audio": f"audio/{row['id']}.wav", "video": f"video/{row['id']}.mp4",
                             "frames": int(round(row["duration"] * FPS))})
    tmp.replace(root / "metadata.csv")
    (root / "README.txt").write_text(_readme(size, seed, rows), encoding="utf-8")
    done.write_text(json.dumps({**stamp, "utterances": len(rows), "speakers": speakers}, indent=1))
    return root


def load(root: Path) -> Corpus:
    """Read a generated demo corpus (see `generate`); media paths are absolute."""
    root = Path(root).resolve()
    meta = root / "metadata.csv"
    if not meta.exists():
        raise UserError(f"{meta} not found: generate the demo corpus first (emofuse demo, or "
                        f"emofuse.corpora.demo.generate('{root}'))")
    utterances = []
    with open(meta, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            utterances.append(Utterance(
                id=row["id"], speaker=row["speaker"], text=row["text"],
                audio=str(root / row["audio"]), video=str(root / row["video"]),
                split=row["split"], labels={"emotion": row["emotion"]},
            ))
    return Corpus(name="demo", utterances=utterances,
                  protocol=Protocol(name="demo-4class", label="emotion", classes=list(CLASSES)))


def _readme(size: str, seed: int, rows: list[dict]) -> str:
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "dev", "test")}
    return f"""emofuse demo corpus (generated by emofuse.corpora.demo, version {VERSION}; size={size}, seed={seed})

{len(rows)} utterances, 4 classes ({", ".join(CLASSES)}), splits by speaker: {counts}.
audio/<id>.wav  16 kHz mono PCM-16, synthetic speech-like audio (prosody carries the emotion)
video/<id>.mp4  {FRAME}x{FRAME} at {FPS} fps, the scikit-image astronaut face warped into an expression
metadata.csv    id, speaker, split, emotion (the label), text (the transcript), media paths;
                clear_audio / clear_text / clear_video say which modalities show the true class
                clearly (the others are ambiguous). They are for analysis, not labels.
Synthetic data: good for testing the pipeline and for seeing what fusion adds, not for science.
"""
