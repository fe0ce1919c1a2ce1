"""The convolutional feature encoder of wav2vec2-style models (wav2vec2, HuBERT, WavLM,
data2vec-audio), computed channels-last with each strided convolution as matrix products.

Why: on a CPU, PyTorch runs these Conv1d layers through oneDNN in channels-first layout and
reorders the 512 x T activations around every call. With bf16 weights that made the seven convs
(~5 GFLOP per second of audio) slower than the twelve transformer layers after them. Here the
activations stay (B, T, C) from the waveform to the last conv; a convolution with kernel k and
stride s is ceil(k/s) matmuls over strided views of its input (strided_conv), and the first
layer's GroupNorm is folded into its conv (conv_channel_norm). On 2 CPU cores this made the
feature encoder of wav2vec2-base ~3x faster in bf16 (see bench/README.md); in float32 it agrees
with transformers' own forward within float rounding (tests/test_encoders.py).

The conv weights are copied once into the matmul layout (k*C_in, C_out), in their dtype at the
time of the swap (hf.py swaps after casting them for autocast); transformers' module is kept for
the rest (norms, activations).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# A GroupNorm layer is folded into its conv from the covariance of its K-dim windows (K = kernel
# x input channels): cheap for the first layer (K = 10), not for a wide one.
MAX_NORM_WINDOW = 64


class ChannelsLastFeatureEncoder(nn.Module):
    """Drop-in for `model.feature_extractor`: (B, samples) -> (B, C, frames), as transformers'."""

    def __init__(self, hf_encoder: nn.Module):
        super().__init__()
        self.hf = hf_encoder
        for layer in hf_encoder.conv_layers:
            if not supported_layer(layer):
                raise ValueError(f"unsupported conv layer {type(layer).__name__}")
        # not buffers: they are derived from the weights, never saved
        self.flat_weights = [flat_weight(layer.conv) for layer in hf_encoder.conv_layers]
        self.lengths = None  # see valid_samples()

    @contextlib.contextmanager
    def valid_samples(self, lengths: list[int]):
        """Within this context each input's GroupNorm statistics come from its first lengths[i]
        samples only, so a zero-padded batch gives every input the frames it gets alone (the
        frames of the padding are left for the attention mask to drop). transformers' own
        GroupNorm averages over the padding too, which is why such models otherwise take no mask."""
        self.lengths = list(lengths)
        try:
            yield
        finally:
            self.lengths = None

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        x = input_values[:, :, None]  # (B, T, 1): channels last from the start
        for layer, w in zip(self.hf.conv_layers, self.flat_weights):
            norm = getattr(layer, "layer_norm", None)
            if isinstance(norm, nn.GroupNorm):
                x = conv_channel_norm(x, layer.conv, w, norm, self.lengths)
            else:
                x = strided_conv(x, layer.conv, w)
                if norm is not None:
                    x = norm(x)  # LayerNorm over channels: the last dimension here
            x = activate(layer.activation, x)
        return x.transpose(1, 2)


def activate(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """activation(x), in place when it is exact GELU (transformers' GELUActivation or nn.GELU): x is
    always a fresh conv output here, and these are the largest tensors of the model (512 x 3,200 per
    second of audio after the first conv). A new output for each cost a pass of page faults: in
    place, a bf16 wav2vec2-base forward on 2 CPU cores ran 1.06x faster (paired A/B), bit-identical."""
    exact_gelu = getattr(activation, "act", None) is nn.functional.gelu or (
        type(activation) is nn.GELU and activation.approximate == "none")
    return torch.ops.aten.gelu_(x) if exact_gelu else activation(x)


def supported_layer(layer: nn.Module) -> bool:
    conv = getattr(layer, "conv", None)
    if not isinstance(conv, nn.Conv1d) or conv.groups != 1 or conv.padding != (0,) or conv.dilation != (1,):
        return False
    if hasattr(conv, "parametrizations") or not hasattr(layer, "activation"):
        return False
    norm = getattr(layer, "layer_norm", None)
    if isinstance(norm, nn.GroupNorm):  # one group per channel, on a layer with small windows (the first)
        k_in = conv.kernel_size[0] * conv.in_channels
        return norm.num_groups == norm.num_channels == conv.out_channels and k_in <= MAX_NORM_WINDOW
    return norm is None or isinstance(norm, nn.LayerNorm)


def windows(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """The conv windows of one channels-last input x (T, C) as a (T_out, k*C) view: row r is
    x[r*s : r*s + k] flattened (tap-major, then channel). Rows overlap in memory when k > s,
    which a strided view allows without copying."""
    t, c = x.shape
    return x.as_strided(((t - k) // s + 1, k * c), (s * c, 1))


def flat_weight(conv: nn.Conv1d) -> torch.Tensor:
    """The (k*C_in, C_out) matrix of a conv's weight, rows in the order of windows()."""
    c_out, c_in, k = conv.weight.shape
    return conv.weight.detach().permute(2, 1, 0).reshape(k * c_in, c_out).contiguous()


def strided_conv(x: torch.Tensor, conv: nn.Conv1d, w: torch.Tensor) -> torch.Tensor:
    """conv(x) for channels-last x (B, T, C_in) -> (B, T_out, C_out), in the dtype of w, the
    conv's flat_weight().

    The windows overlap (k > s), so one matmul over windows() would make the BLAS copy them out
    first (1.5x the input for k=3, s=2: ~10% of the encoder's time). Instead the taps go in groups
    of s: taps [j*s, j*s + s) of every window are row j + r of the input read as non-overlapping
    frames of s samples, a plain strided view, and the conv is the sum over the ceil(k/s) groups
    of frames @ weight rows (2 matmuls for wav2vec2's k=3, s=2 and k=2, s=2: 1)."""
    k, s = conv.kernel_size[0], conv.stride[0]
    x = x.to(w.dtype).contiguous()
    batch, t, c_in = x.shape
    t_out = (t - k) // s + 1
    out = torch.empty(batch, t_out, w.shape[1], dtype=w.dtype, device=x.device)
    for x_b, out_b in zip(x, out):  # one matmul per input: the batch stride breaks the regular rows
        for j in range(0, k, s):
            taps = min(s, k - j)  # the last group may hold fewer than s taps
            frames = x_b.as_strided((t_out, taps * c_in), (s * c_in, 1), x_b.storage_offset() + j * c_in)
            rows = w[j * c_in : (j + taps) * c_in]
            if j == 0:
                if conv.bias is None:
                    torch.mm(frames, rows, out=out_b)
                else:
                    torch.addmm(conv.bias, frames, rows, out=out_b)
            else:
                out_b.addmm_(frames, rows)
    return out


def conv_channel_norm(x: torch.Tensor, conv: nn.Conv1d, w: torch.Tensor, norm: nn.GroupNorm,
                      lengths: list[int] | None = None) -> torch.Tensor:
    """GroupNorm (one group per channel) of conv(x), as one matmul with per-channel scaled weights.

    The conv is linear in its windows X (T_out, K): y = X @ W + b. So each channel's mean over
    time is mean(X) @ W + b, and with the windows centred, Xc = X - mean(X), the norm is
    (y - mean_y) * scale + beta = Xc @ (W * scale) + beta, where each channel's variance is
    diag(W' Cov W) from the K x K covariance of the windows: no pass over the (T_out, C_out)
    output before the one that writes it. (Those activations are 100x the waveform at the first
    layer, and group_norm over them cost 15x the conv here.) Centring the windows, not the output,
    also avoids cancelling a large channel mean. The statistics are float64 (a K x K covariance
    costs nothing; float32 sums over ~10^5 windows were 10x less exact than group_norm's), the
    matmul is in the weights' dtype; w is the conv's flat_weight(). lengths: each input's real
    samples (None: all); the statistics are taken over the windows inside them.
    """
    k, s = conv.kernel_size[0], conv.stride[0]
    dtype = w.dtype
    w = w.double()
    out = torch.empty(len(x), (x.shape[1] - k) // s + 1, w.shape[1], dtype=dtype, device=x.device)
    lengths = lengths or [x.shape[1]] * len(x)
    for x_b, n, out_b in zip(x.double().contiguous(), lengths, out):
        rows = windows(x_b, k, s)
        real = rows[: (n - k) // s + 1]
        centered = rows - real.mean(0)  # the conv bias cancels against the channel mean
        inside = centered[: len(real)]  # the windows within the input's own samples
        var = ((inside.T @ inside / len(real)) @ w * w).sum(0)  # diag(W' Cov W)
        scale = norm.weight.double() * torch.rsqrt(var + norm.eps)
        torch.addmm(norm.bias.to(dtype), centered.to(dtype), (w * scale).to(dtype), out=out_b)
    return out


def use_channels_last_feature_encoder(model: nn.Module) -> bool:
    """Swap a wav2vec2-style model's feature encoder for ChannelsLastFeatureEncoder when every
    layer is of a supported kind (else leave it). Returns whether it was swapped."""
    encoder = getattr(model, "feature_extractor", None)
    layers = getattr(encoder, "conv_layers", None)
    if layers is None or not all(supported_layer(layer) for layer in layers):
        return False
    model.feature_extractor = ChannelsLastFeatureEncoder(encoder)
    return True
