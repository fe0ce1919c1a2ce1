"""Decode media: audio as a float32 mono waveform, video as RGB frames sampled at a fixed rate.

soundfile reads wav/flac/ogg (it can read a short slice of a long session file without decoding
the rest); PyAV reads every other container (mp4, avi, mkv, ...). soxr resamples.
Anything wrong with one file raises PrepareError("decode", reason): the pipeline logs it and goes on.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr

from emofuse.errors import PrepareError

SOUNDFILE_EXTS = {".wav", ".flac", ".ogg"}


def _ffmpeg_reason(e: Exception) -> str:
    """FFmpeg's own words ("Invalid data found when processing input"), without PyAV's errno and
    repeated file name, so that one problem reads (and is counted) the same for every file."""
    return getattr(e, "strerror", None) or str(e)


def _check_range(path, start, end) -> None:
    if not Path(path).is_file():
        raise PrepareError("decode", f"file not found: {path}")
    if start is not None and start < 0:
        raise PrepareError("decode", f"negative start time {start} in {path}")
    if start is not None and end is not None and end <= start:
        raise PrepareError("decode", f"empty time range [{start}, {end}) in {path}")


# ---------------------------------------------------------------------------------------------
# audio


def load_audio(path, sample_rate: int = 16000, start: float | None = None, end: float | None = None) -> np.ndarray:
    """The waveform of [start, end) seconds of `path` (whole file when None), mono float32 at sample_rate."""
    path = str(path)
    _check_range(path, start, end)
    wav, sr = None, None
    if Path(path).suffix.lower() in SOUNDFILE_EXTS:
        try:
            wav, sr = _read_soundfile(path, start, end)
        except (sf.LibsndfileError, RuntimeError, ValueError):
            wav = None  # e.g. a .wav holding a codec libsndfile lacks: let FFmpeg try
    if wav is None:
        wav, sr = _read_pyav(path, start, end)

    if wav.size == 0:
        span = "" if start is None and end is None else f" [{start}, {end})"
        raise PrepareError("decode", f"no audio samples in {path}{span}")
    if not np.isfinite(wav).all():
        raise PrepareError("decode", f"audio contains NaN or Inf values: {path}")
    if sr != sample_rate:
        wav = soxr.resample(wav, sr, sample_rate, quality="HQ")
    return np.ascontiguousarray(wav, dtype=np.float32)


def _read_soundfile(path, start, end) -> tuple[np.ndarray, int]:
    info = sf.info(path)
    sr = info.samplerate
    first = 0 if start is None else int(round(start * sr))
    last = None if end is None else int(round(end * sr))
    # libsndfile silently reads what is there of a cut-off file; a clip that reaches into the missing
    # part would give features of a shorter clip than its transcript and label describe.
    declared = _declared_wav_frames(path) if info.format == "WAV" else None
    if declared is not None and declared > info.frames and (last is None or last > info.frames):
        raise PrepareError("decode", f"truncated file: {path} holds {info.frames} of the {declared} samples "
                                     f"its header announces")
    x, sr = sf.read(path, start=first, stop=last, dtype="float32", always_2d=True)
    return x.mean(axis=1), sr  # average the channels: the same downmix as the PyAV path


def _declared_wav_frames(path) -> int | None:
    """Frames the RIFF header of a WAV file announces (its data chunk size / block align), or None
    when the file is not plain RIFF/WAVE or the size is a streaming writer's placeholder (0 or 2^32-1)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block_align = 0
        while len(chunk := f.read(8)) == 8:
            cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"data":
                if size in (0, 0xFFFFFFFF) or block_align <= 0:
                    return None
                return size // block_align
            if cid == b"fmt ":
                block_align = int.from_bytes(f.read(16)[12:14], "little")
                f.seek(size - 16 + size % 2, 1)  # chunks are padded to an even size
            else:
                f.seek(size + size % 2, 1)
    return None


def _read_pyav(path, start, end) -> tuple[np.ndarray, int]:
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise PrepareError("decode", f"no audio stream in {path}")
            stream = container.streams.audio[0]
            sr = stream.rate
            if start:
                container.seek(int(start * av.time_base))  # lands on a keyframe at or before start
            # Convert every frame to planar float at its native rate and layout; we downmix ourselves.
            resampler = av.AudioResampler(format="fltp")
            pieces, t0 = [], None
            for frame in container.decode(stream):
                if end is not None and frame.time is not None and frame.time >= end:
                    break
                if t0 is None:
                    t0 = frame.time or 0.0  # time of the first decoded sample
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().mean(axis=0))
            for out in resampler.resample(None):  # flush
                pieces.append(out.to_ndarray().mean(axis=0))
    except av.error.FFmpegError as e:
        raise PrepareError("decode", f"cannot decode audio of {path}: {_ffmpeg_reason(e)}") from None
    if not pieces:
        return np.zeros(0, np.float32), sr
    wav = np.concatenate(pieces).astype(np.float32)
    # The decoder starts at a packet boundary; cut to exactly [start, end).
    first = 0 if start is None else max(0, int(round((start - t0) * sr)))
    last = len(wav) if end is None else max(0, int(round((end - t0) * sr)))
    return wav[first:last], sr


# ---------------------------------------------------------------------------------------------
# video


def load_video_frames(
    path, fps: float, start: float | None = None, end: float | None = None, max_frames: int | None = None
) -> np.ndarray:
    """RGB frames (N, H, W, 3) uint8 of [start, end) of `path`, one every 1/fps seconds.

    Each sample is the frame on screen at that instant (the last frame with time <= t), so the
    result does not depend on the file's own frame rate. When the clip holds more than max_frames
    samples, the step grows so that max_frames samples cover the whole clip (never a cut tail).
    """
    path = str(path)
    _check_range(path, start, end)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    frames = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise PrepareError("decode", f"no video stream in {path}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            step = 1.0 / fps
            duration = _clip_duration(container, stream, start, end)
            if max_frames and duration is not None and duration * fps > max_frames:
                step = duration / max_frames
            frame_dur = 1.0 / float(stream.average_rate) if stream.average_rate else step
            if start:
                container.seek(int(start * av.time_base))

            # Sample k is at t0 + k * step; t0 is `start`, or the first frame's time when start is None.
            t0, k = start, 0
            prev, prev_time, prev_rgb = None, None, None
            full = False
            for frame in container.decode(stream):
                t = frame.time
                if t is None:
                    continue
                if t0 is None:
                    t0 = t
                # `prev` is on screen from prev_time until t: it is the sample for every instant in there.
                while prev is not None and t0 + k * step < t and (end is None or t0 + k * step < end):
                    if prev_rgb is None:
                        prev_rgb = prev.to_ndarray(format="rgb24")
                    frames.append(prev_rgb)
                    k += 1
                    full = bool(max_frames) and len(frames) >= max_frames
                    if full:
                        break
                if full or (end is not None and t >= end):
                    break
                prev, prev_time, prev_rgb = frame, t, None
            else:
                # End of the stream: the last frame stays on screen for one frame duration.
                if prev is not None:
                    stop = prev_time + frame_dur if end is None else min(end, prev_time + frame_dur)
                    prev_rgb = prev.to_ndarray(format="rgb24")
                    while t0 + k * step < stop and not (max_frames and len(frames) >= max_frames):
                        frames.append(prev_rgb)
                        k += 1
    except av.error.FFmpegError as e:
        raise PrepareError("decode", f"cannot decode video of {path}: {_ffmpeg_reason(e)}") from None
    if not frames:
        raise PrepareError("decode", f"no video frames decoded from {path} [{start}, {end})")
    return np.stack(frames)


def _clip_duration(container, stream, start, end) -> float | None:
    """Length in seconds of the requested clip, or None when the file does not say."""
    if stream.duration is not None and stream.time_base is not None:
        total = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        total = container.duration / av.time_base
    else:
        total = None
    lo = start or 0.0
    hi = end if end is not None else total
    if hi is None:
        return None
    if total is not None:
        hi = min(hi, total)
    return max(0.0, hi - lo)
