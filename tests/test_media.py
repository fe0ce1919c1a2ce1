"""Decoding audio and video: lengths, cuts, resampling, and clear errors for broken files."""

import av
import numpy as np
import pytest
import soundfile as sf

from emofuse.errors import PrepareError
from emofuse.extract.media import load_audio, load_video_frames


def write_mp4(path, frames, fps=10, audio=None, sample_rate=16000):
    """A small mp4 (h264 + aac) from RGB frames (N, H, W, 3) and an optional mono waveform."""
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "18"}
        if audio is not None:
            aus = out.add_stream("aac", rate=sample_rate)
            aus.layout = "mono"
        for img in frames:
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(vs.encode(None))
        if audio is not None:
            hop = 1024
            for i in range(0, len(audio), hop):
                chunk = audio[i : i + hop].astype(np.float32)[None, :]
                frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = i
                out.mux(aus.encode(frame))
            out.mux(aus.encode(None))


def coloured_frames(n, h=64, w=96):
    """Frame i is a flat colour with red = 10 * i, so a decoded frame tells which frame it was."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, :, :, 0] = 10 * i
        frames[i, :, :, 1] = 128
    return frames


def test_wav_resampled_and_cut(tmp_path):
    sr = 22050
    t = np.arange(int(2.0 * sr)) / sr
    wav = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([wav, wav], axis=1)
    path = tmp_path / "a.wav"
    sf.write(path, stereo, sr)

    x = load_audio(path, 16000)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 32000) <= 1
    assert abs(np.abs(x).max() - 0.3) < 0.02  # downmix averages the channels

    cut = load_audio(path, 16000, start=0.5, end=1.25)
    assert abs(len(cut) - 12000) <= 1
    # the cut is the same signal as the middle of the whole file
    assert np.abs(cut[100:-100] - x[8100 : 8000 + len(cut) - 100]).max() < 1e-3

    same_rate = load_audio(path, sr, start=1.0)
    assert len(same_rate) == sr


def test_mp4_audio_and_frames(tmp_path):
    sr = 16000
    t = np.arange(2 * sr) / sr
    wav = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    path = tmp_path / "v.mp4"
    write_mp4(path, coloured_frames(20), fps=10, audio=wav, sample_rate=sr)

    x = load_audio(path, 16000)
    assert abs(len(x) / 16000 - 2.0) < 0.1
    cut = load_audio(path, 8000, start=0.5, end=1.5)
    assert abs(len(cut) - 8000) <= 2
    # same signal as the whole file at the same instants (aac is lossy: loose tolerance)
    whole8k = load_audio(path, 8000)
    assert np.corrcoef(cut[500:-500], whole8k[4500 : 4500 + len(cut) - 1000])[0, 1] > 0.95

    frames = load_video_frames(path, fps=5)
    assert frames.dtype == np.uint8 and frames.shape == (10, 64, 96, 3)
    # 5 fps out of a 10 fps file: frames 0, 2, 4, ...
    reds = np.round(frames[:, :, :, 0].mean(axis=(1, 2)) / 10).astype(int)
    assert reds.tolist() == list(range(0, 20, 2))

    clip = load_video_frames(path, fps=10, start=0.5, end=1.0)
    reds = np.round(clip[:, :, :, 0].mean(axis=(1, 2)) / 10).astype(int)
    assert reds.tolist() == [5, 6, 7, 8, 9]

    # more samples than max_frames: spread over the whole clip, not a cut tail
    few = load_video_frames(path, fps=10, max_frames=4)
    reds = np.round(few[:, :, :, 0].mean(axis=(1, 2)) / 10).astype(int)
    assert reds.tolist() == [0, 5, 10, 15]


def test_video_without_audio_and_audio_without_video(tmp_path):
    path = tmp_path / "silent.mp4"
    write_mp4(path, coloured_frames(5), fps=10)
    with pytest.raises(PrepareError) as e:
        load_audio(path)
    assert e.value.stage == "decode" and "no audio stream" in e.value.reason

    wav_path = tmp_path / "a.wav"
    sf.write(wav_path, np.zeros(1600, np.float32), 16000)
    with pytest.raises(PrepareError) as e:
        load_video_frames(wav_path, fps=5)
    assert e.value.stage == "decode"


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00garbage" * 10, b"\x00" * 5000])
@pytest.mark.parametrize("suffix", [".wav", ".mp4"])
def test_broken_files_raise_prepare_error(tmp_path, content, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(PrepareError) as e:
        load_audio(path)
    assert e.value.stage == "decode"
    with pytest.raises(PrepareError) as e:
        load_video_frames(path, fps=5)
    assert e.value.stage == "decode"


def test_truncated_wav_is_refused_where_the_clip_reaches_the_missing_part(tmp_path):
    full = tmp_path / "full.wav"
    sf.write(full, np.zeros(32000, np.float32), 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: 44 + 2 * 10000])  # header + 10,000 of the 32,000 samples
    with pytest.raises(PrepareError, match="truncated file: .* holds 10000 of the 32000 samples"):
        load_audio(cut)
    with pytest.raises(PrepareError, match="truncated file"):
        load_audio(cut, start=0.5, end=1.0)
    assert len(load_audio(cut, start=0.1, end=0.5)) == 6400  # wholly inside what is there
    assert len(load_audio(full)) == 32000


def test_truncated_mp4(tmp_path):
    path = tmp_path / "v.mp4"
    write_mp4(path, coloured_frames(20), fps=10, audio=np.zeros(32000, np.float32))
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])  # the index (moov) is written last: it is gone
    with pytest.raises(PrepareError):
        load_video_frames(cut, fps=5)
    with pytest.raises(PrepareError):
        load_audio(cut)


def test_bad_audio_values_and_ranges(tmp_path):
    path = tmp_path / "nan.wav"
    x = np.zeros(1600, np.float32)
    x[10] = np.nan
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(PrepareError, match="NaN"):
        load_audio(path)

    ok = tmp_path / "ok.wav"
    sf.write(ok, np.zeros(16000, np.float32), 16000)
    with pytest.raises(PrepareError, match="no audio samples"):
        load_audio(ok, start=2.0, end=3.0)  # past the end of the file
    with pytest.raises(PrepareError, match="empty time range"):
        load_audio(ok, start=0.5, end=0.5)
    with pytest.raises(PrepareError, match="not found"):
        load_audio(tmp_path / "missing.wav")
