"""The FabNet backend: loads a checkpoint laid out like the official release, computes exactly what
the original network computes, refuses wrong keys and unsafe pickles, and crops faces.

The reference is the encoder written the way FAb-Net's models_multiview.py writes it (one shared
in-place LeakyReLU, BatchNorm after convs 2-7), with random weights and running statistics.
"""

import argparse

import numpy as np
import pytest
import torch
from torch import nn

from emofuse.cache.store import FeatureStore
from emofuse.corpora.base import Utterance
from emofuse.errors import UserError
from emofuse.extract.encoders.base import build_encoder, file_sha256
from emofuse.extract.encoders.fabnet import box_crop
from emofuse.extract.pipeline import extract_modality
from tests.test_media import write_mp4

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def original_encoder(num_filters=32, output_size=256):
    """FAb-Net's generate_encoder_layers, as in the release code."""
    f = num_filters
    conv = [nn.Conv2d(3, f, 4, 2, 1), nn.Conv2d(f, f * 2, 4, 2, 1), nn.Conv2d(f * 2, f * 4, 4, 2, 1),
            nn.Conv2d(f * 4, f * 8, 4, 2, 1), nn.Conv2d(f * 8, f * 8, 4, 2, 1), nn.Conv2d(f * 8, f * 8, 4, 2, 1),
            nn.Conv2d(f * 8, f * 8, 4, 2, 1), nn.Conv2d(f * 8, output_size, 4, 2, 1)]
    bn = [nn.BatchNorm2d(c) for c in (f * 2, f * 4, f * 8, f * 8, f * 8, f * 8)]
    lrelu = nn.LeakyReLU(0.2, True)
    return nn.Sequential(conv[0], lrelu, conv[1], bn[0], lrelu, conv[2], bn[1], lrelu, conv[3], bn[2], lrelu,
                         conv[4], bn[3], lrelu, conv[5], bn[4], lrelu, conv[6], bn[5], lrelu, conv[7])


class Release(nn.Module):
    """Encoder + stand-ins for the decoders that share the release's state_dict_model."""

    def __init__(self):
        super().__init__()
        self.encoder = original_encoder()
        self.decoder = nn.Sequential(nn.ReLU(), nn.Conv2d(512, 8, 3, 1, 1), nn.BatchNorm2d(8))
        self.mask = nn.Sequential(nn.ReLU(), nn.Conv2d(512, 1, 3, 1, 1))


def random_release(seed=0):
    torch.manual_seed(seed)
    model = Release()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # trained-looking statistics, so BatchNorm really matters
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def save_release(path, model, prefix="", drop_batches_tracked=("encoder.3.", "encoder.12.")):
    state = {prefix + k: v for k, v in model.state_dict().items()
             if not (k.endswith("num_batches_tracked") and k.startswith(drop_batches_tracked))}
    classifier = nn.Sequential(nn.BatchNorm1d(256), nn.Linear(256, 8, bias=False))
    opts = argparse.Namespace(lr=1e-4, num_additional_ids=32, embedding_size=256)  # as FAb-Net's scripts save
    torch.save({"state_dict_model": state, "state_dict": classifier.state_dict(), "epoch": 3, "opts": opts}, path)
    return str(path)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    model = random_release()
    path = save_release(tmp_path_factory.mktemp("fabnet") / "affectnet_4views.pth", model)
    return model, path


def reference(model, crops):
    with torch.inference_mode():
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
        return model.encoder(x).reshape(len(crops), 256).numpy()


def maxdiff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def random_crops(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# exactness and batching


def test_release_checkpoint_matches_the_original_network(release):
    model, path = release
    enc = build_encoder("video", {"backend": "fabnet", "checkpoint": path, "crop": "none"})
    assert enc.modality == "video" and enc.dim == 256 and enc.fps == 5.0
    crops = random_crops(5)
    a, b = enc.encode([crops[:2], crops[2:]])
    assert a.shape == (2, 256) and b.shape == (3, 256) and a.dtype == np.float32
    ref = reference(model, crops)
    diff = maxdiff(np.concatenate([a, b]), ref)
    print(f"fabnet max abs diff vs the original encoder: {diff:.2e}")
    assert diff < TOL
    # eval-mode BatchNorm: a frame's vector does not depend on its batch-mates or on batch_frames
    alone = [enc.encode([crops[i : i + 1]])[0] for i in range(5)]
    assert maxdiff(np.concatenate(alone), ref) < TOL
    small = build_encoder("video", {"backend": "fabnet", "checkpoint": path, "crop": "none", "batch_frames": 2})
    assert maxdiff(np.concatenate(small.encode([crops])), ref) < TOL

    spec = enc.full_spec()
    assert spec["checkpoint_sha256"] == file_sha256(path) and spec["crop"] == {"mode": "none", "size": 256}
    assert spec["dtype"] == "float32" and "detector" not in spec


def test_dataparallel_prefix_and_bare_state_dicts_load(release, tmp_path):
    model, _ = release
    crops = random_crops(2, seed=1)
    prefixed = save_release(tmp_path / "module.pth", model, prefix="module.")
    bare = tmp_path / "bare.pth"
    torch.save(model.encoder.state_dict(), bare)  # keys 0.weight ...: not FabNet's layout
    enc = build_encoder("video", {"backend": "fabnet", "checkpoint": prefixed, "crop": "none"})
    assert maxdiff(enc.encode([crops])[0], reference(model, crops)) < TOL
    with pytest.raises(UserError, match="not a FabNet checkpoint"):
        build_encoder("video", {"backend": "fabnet", "checkpoint": str(bare)})
    torch.save({"encoder." + k: v for k, v in model.encoder.state_dict().items()}, bare)
    enc = build_encoder("video", {"backend": "fabnet", "checkpoint": str(bare), "crop": "none"})
    assert maxdiff(enc.encode([crops])[0], reference(model, crops)) < TOL


def test_bfloat16_is_close(release):
    model, path = release
    enc = build_encoder("video", {"backend": "fabnet", "checkpoint": path, "crop": "none", "dtype": "bfloat16"})
    crops = random_crops(2, seed=2)
    ref = reference(model, crops)
    out = enc.encode([crops])[0]
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert enc.full_spec()["dtype"] == "bfloat16"
    with pytest.raises(UserError, match="float16 needs a GPU"):
        build_encoder("video", {"backend": "fabnet", "checkpoint": path, "dtype": "float16", "device": "cpu"})


# ---------------------------------------------------------------------------------------------
# wrong files are errors, never a random init


def edited(tmp_path, model, name, edit):
    state = dict(model.state_dict())
    edit(state)
    torch.save({"state_dict_model": state}, tmp_path / name)
    return str(tmp_path / name)


def test_key_mismatches_are_user_errors(release, tmp_path):
    model, _ = release

    def rename(s):
        s["encoder.21.weight"] = s.pop("encoder.20.weight")

    def reshape(s):
        s["encoder.20.weight"] = torch.zeros(128, 256, 4, 4)

    def drop(s):
        del s["encoder.9.running_var"]

    def extra(s):
        s["encoder.3.extra"] = torch.zeros(1)

    def foreign(s):
        s["classifier.weight"] = torch.zeros(8, 256)

    for edit, match in [(rename, "unexpected.*encoder.21.weight"), (reshape, "encoder.20.weight has shape"),
                        (drop, "missing.*encoder.9.running_var"), (extra, "unexpected.*encoder.3.extra"),
                        (foreign, "unexpected.*classifier.weight")]:
        path = edited(tmp_path, model, edit.__name__ + ".pth", edit)
        with pytest.raises(UserError, match=match):
            build_encoder("video", {"backend": "fabnet", "checkpoint": path})


def test_missing_checkpoint_says_what_to_put_where(tmp_path):
    with pytest.raises(UserError, match="option 'checkpoint' is required"):
        build_encoder("video", {"backend": "fabnet"})
    with pytest.raises(UserError, match=r"not found.*release_bmvc_fabnet.zip.*affectnet_4views.pth"):
        build_encoder("video", {"backend": "fabnet", "checkpoint": str(tmp_path / "fabnet" / "model.pth")})
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        build_encoder("video", {"backend": "fabnet", "checkpoint": str(bad)})
    with pytest.raises(UserError, match="crop must be one of"):
        build_encoder("video", {"backend": "fabnet", "checkpoint": str(bad), "crop": "tight"})


class Payload:
    """Unpickling this would create a file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_runs_code_is_refused_unless_trusted(release, tmp_path):
    model, _ = release
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict_model": model.state_dict(), "extra": Payload(marker)}, path)
    with pytest.raises(UserError, match=r"refers to io.open.*trust_checkpoint"):
        build_encoder("video", {"backend": "fabnet", "checkpoint": str(path)})
    assert not marker.exists()
    # The user vouches for the file: it is fully unpickled (and here, the payload runs).
    enc = build_encoder("video", {"backend": "fabnet", "checkpoint": str(path), "trust_checkpoint": True})
    assert marker.exists() and enc.dim == 256


# ---------------------------------------------------------------------------------------------
# frames, faces and the cache


@pytest.fixture(scope="module")
def face_video(tmp_path_factory):
    """2 s at 25 fps of the astronaut's face (256x256), moving a little."""
    from skimage import data

    img = data.astronaut()[40:296, 96:352]
    frames = np.stack([np.roll(img, i, axis=1) for i in range(50)])
    path = tmp_path_factory.mktemp("video") / "face.mp4"
    write_mp4(path, frames, fps=25)
    return str(path)


@pytest.mark.parametrize("crop", ["box", "aligned"])
def test_face_crops(release, face_video, crop):
    model, path = release
    enc = build_encoder("video", {"backend": "fabnet", "checkpoint": path, "crop": crop})
    item = enc.prepare(Utterance(id="f", video=face_video))
    assert item.shape == (10, 256, 256, 3) and item.dtype == np.uint8 and enc.size(item) == 10
    out = enc.encode([item])[0]
    assert maxdiff(out, reference(model, item)) < TOL
    spec = enc.full_spec()
    assert spec["crop"]["mode"] == crop and spec["detector"] == "dlib"


def test_box_crop_pads_outside_the_frame():
    frame = np.full((100, 200, 3), 200, np.uint8)
    crop = box_crop(frame, (0, 0, 40, 40), margin=0.5, size=256)  # the square sticks out top-left
    assert crop.shape == (256, 256, 3)
    assert crop[:50, :50].max() == 0 and crop[-50:, -50:].min() == 200


def test_cache_holds_the_original_networks_output(release, face_video, tmp_path):
    model, path = release
    enc = build_encoder("video", {"backend": "fabnet", "checkpoint": path, "crop": "none", "fps": 10})
    utts = [Utterance(id="a", video=face_video), Utterance(id="b", video=face_video, start=0.5, end=1.2)]
    result = extract_modality(utts, enc, tmp_path, budget=256, workers=1, progress=False, log=lambda *a: None)
    assert result.encoded == 2 and result.failed == 0
    store = FeatureStore(result.store)
    for u in utts:
        ref = reference(model, enc.prepare(u))
        cached = store.get(u.id)
        assert cached.dtype == np.float16 and cached.shape == ref.shape
        # the cache stores float16: equal to the reference up to float16 rounding
        np.testing.assert_allclose(cached.astype(np.float32), ref, rtol=2**-11, atol=1e-6)
    assert store.get("a").shape == (20, 256) and store.get("b").shape == (7, 256)
    assert FeatureStore.verify(result.store) == []
