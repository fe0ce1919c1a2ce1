"""SSE-FT fusion model: shapes, masking, missing modalities, layer mixing, long inputs, learning."""

import json

import pytest
import torch

from emofuse.errors import UserError
from emofuse.fuse.model import SSEFT, FusionConfig, fit_length, pool_time

DIMS = {"audio": 12, "text": 16, "video": 8}
SUBSETS = [["audio"], ["text"], ["video"], ["audio", "text"], ["audio", "video"], ["text", "video"],
           ["audio", "text", "video"]]


def small_config(modalities, preset="fast", **kw):
    settings = dict(num_layers_in={m: 1 for m in modalities}, width=16, heads=4, ffn=32, cross_layers=1)
    return FusionConfig(
        modalities=modalities, input_dims={m: DIMS[m] for m in modalities}, num_outputs=3, preset=preset,
        **(settings | kw),
    )


def make_batch(cfg, lengths, seed=0):
    """Random features, right-padded to the longest length; lengths[m] is a list per sample."""
    g = torch.Generator().manual_seed(seed)
    feats, masks = {}, {}
    for m in cfg.modalities:
        T = max(lengths[m])
        L = cfg.num_layers_in[m]
        per_frame = (cfg.input_dims[m],) if L == 1 else (L, cfg.input_dims[m])
        feats[m] = torch.randn(len(lengths[m]), T, *per_frame, generator=g)
        masks[m] = torch.arange(T)[None, :] < torch.tensor(lengths[m])[:, None]
    return feats, masks


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: one thread is faster, and far faster when other jobs share the CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model_for(cfg, seed=0):
    torch.manual_seed(seed)
    return SSEFT(cfg).eval()


@pytest.mark.parametrize("modalities", SUBSETS, ids=lambda s: "".join(m[0].upper() for m in s))
@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_output_shape_every_subset_and_preset(modalities, preset):
    cfg = small_config(modalities, preset=preset)
    model = model_for(cfg)
    feats, masks = make_batch(cfg, {m: [5, 3] for m in modalities})
    out = model(feats, masks, torch.ones(2, len(modalities), dtype=torch.bool))
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()
    # the cross stacks are exactly the directional pairs among the configured modalities
    n = len(modalities)
    assert len(model.cross) == n * (n - 1)


def test_paper_preset_keeps_native_widths():
    cfg = small_config(["audio", "text", "video"], preset="paper")
    model = model_for(cfg)
    assert model.head[1].in_features == sum(DIMS.values())
    assert isinstance(model.streams["text"].proj, torch.nn.Identity)


def test_padding_frames_do_not_change_the_output():
    cfg = small_config(["audio", "text", "video"], pool_stride={"audio": 3, "text": 1, "video": 2})
    model = model_for(cfg)
    feats, masks = make_batch(cfg, {"audio": [7, 5], "text": [4, 6], "video": [5, 5]})
    before = model(feats, masks)
    padded_f, padded_m = {}, {}
    for m in cfg.modalities:  # 9 extra frames of garbage, masked out
        B, T = masks[m].shape
        padded_f[m] = torch.cat([feats[m], 100 * torch.randn(B, 9, *feats[m].shape[2:])], dim=1)
        padded_m[m] = torch.cat([masks[m], torch.zeros(B, 9, dtype=torch.bool)], dim=1)
    after = model(padded_f, padded_m)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("modalities", [["audio"], ["audio", "text"]], ids=["A", "AT"])
def test_stats_pool_reads_mean_and_std_of_the_real_frames(modalities):
    cfg = small_config(modalities, stats_pool=True, dropout=0.0)
    model = model_for(cfg)
    assert model.head[1].in_features == 3 * 16 * len(modalities)  # position 0, mean, std per modality
    feats, masks = make_batch(cfg, {m: [7, 4] for m in modalities})
    before = model(feats, masks)
    padded_f = {m: torch.cat([feats[m], 100 * torch.randn(2, 5, *feats[m].shape[2:])], dim=1) for m in modalities}
    padded_m = {m: torch.cat([masks[m], torch.zeros(2, 5, dtype=torch.bool)], dim=1) for m in modalities}
    torch.testing.assert_close(model(padded_f, padded_m), before, atol=1e-5, rtol=0)  # padding ignored
    # the statistics reach the head: zeroing the head's weights on them changes the output
    with torch.no_grad():
        model.head[1].weight[:, 16 * len(modalities):] = 0
    assert not torch.allclose(model(feats, masks), before, atol=1e-4)
    # an absent modality gives zero statistics, like its zero pooled vector
    if len(modalities) > 1:
        from emofuse.fuse.model import stats_pool
        assert stats_pool(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)).abs().sum() == 0
    assert small_config(modalities).stats_pool is False  # off in the presets


def test_sample_output_does_not_depend_on_the_rest_of_the_batch():
    cfg = small_config(["audio", "text", "video"])
    model = model_for(cfg)
    lengths = {"audio": [3, 9, 6], "text": [5, 2, 8], "video": [4, 4, 7]}
    feats, masks = make_batch(cfg, lengths)
    batch_out = model(feats, masks)
    for b in range(3):  # alone, cropped to its own length
        f = {m: feats[m][b : b + 1, : lengths[m][b]] for m in cfg.modalities}
        k = {m: masks[m][b : b + 1, : lengths[m][b]] for m in cfg.modalities}
        torch.testing.assert_close(model(f, k)[0], batch_out[b], atol=1e-5, rtol=0)


@pytest.mark.parametrize("absent", ["audio", "text", "video"])
def test_absent_modality_contents_are_ignored(absent):
    cfg = small_config(["audio", "text", "video"])
    model = model_for(cfg)
    feats, masks = make_batch(cfg, {"audio": [6, 4], "text": [5, 7], "video": [3, 6]})
    present = torch.ones(2, 3, dtype=torch.bool)
    present[0, cfg.modalities.index(absent)] = False
    out1 = model(feats, masks, present)
    garbage = dict(feats)
    garbage[absent] = feats[absent].clone()
    garbage[absent][0] = 1e3 * torch.randn_like(feats[absent][0])
    out2 = model(garbage, masks, present)
    torch.testing.assert_close(out2, out1, atol=1e-5, rtol=0)
    # NaN garbage as well: it is zeroed before any arithmetic
    garbage[absent][0] = float("nan")
    torch.testing.assert_close(model(garbage, masks, present), out1, atol=1e-5, rtol=0)
    # the dict form of `present` means the same
    as_dict = {m: present[:, i] for i, m in enumerate(cfg.modalities)}
    torch.testing.assert_close(model(feats, masks, as_dict), out1)
    # the other sample is untouched and the modality really matters when present
    assert not torch.allclose(model(feats, masks)[0], out1[0], atol=1e-4)


@pytest.mark.parametrize("absent", ["audio", "text", "video"])
def test_modality_absent_for_the_whole_batch_gives_no_nan_and_gets_gradients(absent):
    cfg = small_config(["audio", "text", "video"], dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    model = SSEFT(cfg).train()
    feats, masks = make_batch(cfg, {"audio": [6, 4], "text": [5, 7], "video": [3, 6]})
    present = {absent: torch.zeros(2, dtype=torch.bool)}
    out = model(feats, masks, present)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # leaving the modality out of `features` altogether is the same as marking it absent
    model.eval()
    rest = {m: feats[m] for m in cfg.modalities if m != absent}
    torch.testing.assert_close(model(rest, masks), model(feats, masks, present), atol=1e-5, rtol=0)


def test_all_frames_masked_counts_as_absent():
    cfg = small_config(["audio", "text"])
    model = model_for(cfg)
    feats, masks = make_batch(cfg, {"audio": [4, 4], "text": [3, 5]})
    masks["audio"][1] = False
    present = torch.tensor([[True, True], [False, True]])
    torch.testing.assert_close(model(feats, masks), model(feats, masks, present))


def test_layer_mixing():
    cfg = small_config(["audio", "text"], num_layers_in={"audio": 5, "text": 1})
    torch.manual_seed(0)
    model = SSEFT(cfg)
    w = model.layer_weights()
    assert set(w) == {"audio"}
    assert w["audio"] == pytest.approx([0.2] * 5)  # initialised equal
    feats, masks = make_batch(cfg, {"audio": [6, 4], "text": [5, 7]})
    assert feats["audio"].shape == (2, 6, 5, DIMS["audio"])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(feats, masks).sum().backward()
    assert model.streams["audio"].layer_logits.grad.abs().sum() > 0
    opt.step()
    w = model.layer_weights()["audio"]
    assert sum(w) == pytest.approx(1.0)
    assert max(w) - min(w) > 1e-6  # they moved
    # a layer-mixed modality left out of the batch altogether
    assert torch.isfinite(model({"text": feats["text"]}, masks)).all()
    with pytest.raises(ValueError, match="audio"):
        model(
            {"audio": torch.randn(2, 6, DIMS["audio"]), "text": feats["text"]}, masks
        )  # (T, D) given where (T, L, D) is configured


def test_sequences_longer_than_max_positions():
    cfg = small_config(["audio", "text"], max_positions=8, pool_stride={"audio": 2})
    model = model_for(cfg)
    feats, masks = make_batch(cfg, {"audio": [50, 9], "text": [30, 3]})
    out = model(feats, masks)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    # still per sample: the long sample alone gives the same answer
    f1 = {m: feats[m][:1] for m in cfg.modalities}
    k1 = {m: masks[m][:1] for m in cfg.modalities}
    torch.testing.assert_close(model(f1, k1)[0], out[0], atol=1e-5, rtol=0)


def test_fit_length_is_a_masked_mean_over_every_real_frame():
    x = torch.arange(10.0).view(1, 10, 1).repeat(2, 1, 1)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 3:] = False  # sample 1 has 3 real frames: fits, stays as it is
    y, m = fit_length(x, mask, 4)
    # sample 0: 10 frames -> bins floor(r*4/10): r 0-2 -> 0, 3-4 -> 1, 5-7 -> 2, 8-9 -> 3
    assert y[0, :, 0].tolist() == pytest.approx([1.0, 3.5, 6.0, 8.5])
    assert m[0].tolist() == [True] * 4
    assert y[1, :3, 0].tolist() == [0.0, 1.0, 2.0]
    assert m[1].tolist() == [True, True, True, False]


def test_pool_time_masked_mean():
    x = torch.tensor([[1.0, 3.0, 5.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 6.0]]).unsqueeze(-1)  # zero padding, as Stream leaves it
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    y, m = pool_time(x, mask, 2)
    # windows (1, 3) -> 2; (5, pad) -> 5; (pad) -> masked;  (1, 2), (3, 4), (6): the last window is shorter
    assert y[0, :2, 0].tolist() == [2.0, 5.0] and y[1, :, 0].tolist() == [1.5, 3.5, 6.0]
    assert m.tolist() == [[True, True, False], [True, True, True]]


def test_config_round_trip_and_errors():
    cfg = small_config(["audio", "video"], pool_stride={"audio": 4}, num_layers_in={"audio": 3, "video": 1})
    again = FusionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.pool_stride == {"audio": 4, "text": 1, "video": 2}  # text, video: the fast preset's
    with pytest.raises(UserError, match="canonical order"):
        small_config(["video", "audio"])
    with pytest.raises(UserError, match="unknown"):
        FusionConfig.from_dict(cfg.to_dict() | {"widht": 3})
    with pytest.raises(UserError, match="divisible"):
        small_config(["audio"], heads=5)


def test_presets_fill_what_the_config_leaves_out():
    dims = {"text": 1024, "audio": 512, "video": 256}
    paper = FusionConfig(modalities=["audio", "text", "video"], input_dims=dims, num_layers_in={}, num_outputs=1,
                         preset="paper", self_layers={"video": 1})
    assert (paper.cross_layers, paper.ffn, paper.attn_dropout) == (2, 1024, 0.1)
    assert paper.self_layers == {"audio": 2, "text": 0, "video": 1}  # key by key
    fast = FusionConfig(modalities=["audio"], input_dims=dims, num_layers_in={}, num_outputs=1, dropout=0.3)
    assert (fast.preset, fast.width, fast.cross_layers, fast.dropout, fast.attn_dropout) == ("fast", 128, 1, 0.3, 0.0)
    assert fast.pool_stride == {"audio": 8, "text": 1, "video": 2}
    with pytest.raises(UserError, match="preset must be one of paper, fast"):
        FusionConfig(modalities=["audio"], input_dims=dims, num_layers_in={}, num_outputs=1, preset="tiny")


@pytest.mark.parametrize("modalities", [["audio", "text", "video"], ["audio"]], ids=["ATV", "A"])
def test_last_layer_on_the_pooled_position_only_changes_nothing(modalities):
    # The last cross layer (and a single-modality model's last self layer) runs for position 0 only,
    # the only position read. Recompute every layer over the whole sequence: the same logits.
    torch.manual_seed(0)
    cfg = small_config(modalities, cross_layers=2, self_layers={"audio": 2, "text": 1, "video": 2})
    model = SSEFT(cfg).eval()
    feats, masks = make_batch(cfg, {m: [7, 3, 5] for m in modalities})

    with torch.no_grad():
        got = model(feats, masks)
        streams = {m: model.streams[m](feats[m], masks[m], start_only=False) for m in modalities}
        pooled = []
        for m in modalities:
            outs = []
            for q, src in model.pairs:
                if q == m:
                    y = streams[q][0]
                    for layer in model.cross[f"{q}_to_{src}"].layers:
                        y = layer(y, *streams[src])
                    outs.append(y[:, 0])
            v = outs[0] if outs else streams[m][0][:, 0]
            for o in outs[1:]:
                v = v * o
            pooled.append(v)
        want = model.head(torch.cat(pooled, dim=-1))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_paper_preset_has_about_43m_parameters():
    cfg = FusionConfig(
        modalities=["audio", "text", "video"],
        input_dims={"text": 1024, "audio": 512, "video": 256},
        num_layers_in={"audio": 1, "text": 1, "video": 1},
        num_outputs=8,
        preset="paper",
    )
    n = SSEFT(cfg).count_parameters()
    assert 42e6 < n < 44e6, n


@pytest.mark.parametrize("modalities", [["audio", "text", "video"], ["text"]], ids=["ATV", "T"])
def test_overfits_a_tiny_separable_dataset(modalities):
    # The class is written into the features of every modality (a shifted mean): the model must
    # drive the training loss clearly down. Text-only checks the no-self-layer stream learns too.
    torch.manual_seed(0)
    cfg = small_config(modalities, dropout=0.0, attn_dropout=0.0)
    n = 24
    y = torch.arange(n) % 3
    feats, masks = make_batch(cfg, {m: [4 + (i % 5) for i in range(n)] for m in modalities}, seed=1)
    for m in modalities:
        direction = torch.randn(3, DIMS[m])
        feats[m] = feats[m] + 1.5 * direction[y][:, None, :]
    model = SSEFT(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(feats, masks), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9  # about ln 3 at the start
    assert losses[-1] < 0.1, losses[::15]
    model.eval()
    assert (model(feats, masks).argmax(1) == y).all()


def test_dropout_keeps_the_expected_share_and_mean():
    from emofuse.fuse.model import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.3)
    x = torch.ones(1000, 1001)  # an odd count: the last 64-bit draw is used in part
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.7) < 0.003, kept  # 1,001,000 Bernoulli draws: std 0.0005
    assert abs(y.mean().item() - 1.0) < 0.005 and torch.allclose(y[y != 0], torch.tensor(1 / 0.7))
    # neighbours (the four 16-bit parts of one draw) are independent: P(both kept) = 0.49
    pairs = (y.flatten()[:-1:2] != 0) & (y.flatten()[1::2] != 0)
    assert abs(pairs.float().mean().item() - 0.49) < 0.004
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    assert not Dropout(1.0)(x).any() and Dropout(0.999999)(x).isfinite().all()  # like nn.Dropout
    torch.manual_seed(1)
    a = Dropout(0.5)(x)
    torch.manual_seed(1)
    assert torch.equal(a, Dropout(0.5)(x))  # seeded by torch's generator
    g = torch.ones(3, 5, requires_grad=True)
    out = Dropout(0.5)(g)
    out.sum().backward()
    assert torch.equal(g.grad, out.detach())  # gradient flows through kept elements only, scaled alike


def test_unfrozen_encoder_layers_see_only_real_tokens_and_absent_text_stays_finite():
    """unfreeze_top: the encoder's layers replace the layer mix and run on the cached state below
    them; a sample's output does not depend on its batch-mates' lengths (padding is masked out of
    their attention), and a sample without text gives no NaN, forward or backward."""
    layer = dict(width=16, heads=2, ffn=32, eps=1e-12, dropout=0.0, attn_dropout=0.0)
    cfg = small_config(["audio", "text"], num_layers_in={"audio": 1, "text": 3}, unfreeze_top={"text": 2},
                       encoder_layer={"text": layer}, self_layers={"audio": 1, "text": 0}, dropout=0.0)
    model = model_for(cfg)
    assert len(model.streams["text"].encoder_top) == 2 and model.streams["text"].layer_logits is None
    lengths = {"audio": [3, 9, 6], "text": [5, 2, 8]}
    feats, masks = make_batch(cfg, lengths)
    batch_out = model(feats, masks)
    for b in range(3):
        f = {m: feats[m][b : b + 1, : lengths[m][b]] for m in cfg.modalities}
        k = {m: masks[m][b : b + 1, : lengths[m][b]] for m in cfg.modalities}
        torch.testing.assert_close(model(f, k)[0], batch_out[b], atol=1e-5, rtol=0)
    # only the state below the unfrozen layers is read: the top cached layer is not
    changed = {**feats, "text": feats["text"].clone()}
    changed["text"][:, :, 2] = 1e3
    torch.testing.assert_close(model(changed, masks), batch_out)
    model.train()
    out = model(feats, masks, {"text": torch.tensor([True, False, True])})
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(UserError, match="cache every layer"):
        small_config(["text"], num_layers_in={"text": 2}, unfreeze_top={"text": 2}, encoder_layer={"text": layer})
    with pytest.raises(UserError, match="no encoder layer shape"):
        small_config(["text"], num_layers_in={"text": 3}, unfreeze_top={"text": 1})
