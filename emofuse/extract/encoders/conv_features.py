"""The convolutional feature encoder of wav2vec2-style models (wav2vec2, HuBERT, WavLM,
data2vec-audio), computed channels-last with each strided convolution as matrix products.

Why: on a CPU, PyTorch runs these Conv1d layers through oneDNN in channels-first layout and
reorders the 512 x T activations around every call. With bf16 weights that made the seven convs
(~5 GFLOP per second of audio) slower than the twelve transformer layers after them. Here the
activations stay (T, C) from the waveform to the last conv; a convolution with kernel k and
stride s is ceil(k/s) matmuls over strided views of its input (strided_conv), the first layer's
GroupNorm is folded into its conv (channel_norm), and each input runs in tiles of output frames
so that its activations stay in the CPU's cache (ChannelsLastFeatureEncoder). On 2 CPU cores
this made the feature encoder of wav2vec2-base ~3x faster in bf16 (see bench/README.md); in
float32 it agrees with transformers' own forward within float rounding (tests/test_encoders.py).
The fairseq backend runs fairseq's wav2vec 2.0 / HuBERT conv blocks through it too
(fairseq_backend.FairseqConvLayer).

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

# Output frames per tile of the feature encoder (ChannelsLastFeatureEncoder): 256 frames (5.1 s of
# audio at 16 kHz) keep the first layer's bf16 output at 16 MB. In a bf16 forward of three 8 s
# clips on this project's 2-core CPU the feature encoder took 84 ms instead of 103 with whole,
# batched activations; the whole forward ran 1.03-1.07x faster (paired A/B; bench/README.md,
# "tiled feature encoder"). Tiles of 96-1,024 frames timed alike.
TILE_FRAMES = 256


def tile_frames_for(device: str) -> int | None:
    """Tiles on a CPU; whole inputs on a GPU, where tiles only add kernel launches: 200 clips of
    2-15 s ran at 1,175 audio s/s without tiles and 973 with them on an H200, in bf16 (bench/README.md,
    "GPU profile")."""
    return None if device.startswith("cuda") else TILE_FRAMES


class ChannelsLastFeatureEncoder(nn.Module):
    """Drop-in for `model.feature_extractor`: (B, samples) -> (B, C, frames), as transformers'.

    Each input runs alone, in tiles of `tile_frames` output frames: every layer computes just the
    frames the tile needs (a few frames of overlap per layer, k - s), so the first layers'
    activations (512 x 3,200 per second of audio) are used while they are still in the CPU's cache
    instead of going out to memory and back. The first layer's GroupNorm statistics come from the
    whole input before any tile runs. Tiles do not change the arithmetic of a row, only the number
    of rows per matmul, which can change the last bits in bf16 (the spec names the tile size)."""

    def __init__(self, hf_encoder: nn.Module, tile_frames: int | None = TILE_FRAMES):
        super().__init__()
        self.hf = hf_encoder
        for layer in hf_encoder.conv_layers:
            if not supported_layer(layer):
                raise ValueError(f"unsupported conv layer {type(layer).__name__}")
        # not buffers: they are derived from the weights, never saved
        self.flat_weights = [flat_weight(layer.conv) for layer in hf_encoder.conv_layers]
        self.kernels = [layer.conv.kernel_size[0] for layer in hf_encoder.conv_layers]
        self.strides = [layer.conv.stride[0] for layer in hf_encoder.conv_layers]
        self.tile_frames = tile_frames  # None: each input whole (tile_frames_for)
        self.lengths = None  # see valid_samples()

    @property
    def name(self) -> str:
        """What the spec records: how the features were computed."""
        if self.tile_frames is None:
            return "channels-last-matmul, whole inputs"
        return f"channels-last-matmul, tiles of {self.tile_frames} frames"

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
        batch, samples = input_values.shape
        frames = samples
        for k, s in zip(self.kernels, self.strides):
            frames = (frames - k) // s + 1
        w_last = self.flat_weights[-1]
        out = torch.empty(batch, frames, w_last.shape[1], dtype=w_last.dtype, device=input_values.device)
        lengths = self.lengths or [samples] * batch
        for x, n, out_x in zip(input_values, lengths, out):
            first = self.first_layer(x, n)
            step = self.tile_frames or max(frames, 1)
            for f0 in range(0, frames, step):
                f1 = min(f0 + step, frames)
                out_x[f0:f1] = self.tile(x, first, f0, f1)
        return out.transpose(1, 2)

    def first_layer(self, x: torch.Tensor, n: int):
        """The first conv as a function of a span (T, 1) of x's samples: with its GroupNorm folded
        in from the statistics of the windows within the first n samples of x (channel_norm), or
        plain."""
        layer, w = self.hf.conv_layers[0], self.flat_weights[0]
        norm = getattr(layer, "layer_norm", None)
        if isinstance(norm, nn.GroupNorm):
            return channel_norm(x[:, None], n, layer.conv, w, norm)
        return lambda span: self.conv(0, span)

    def conv(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Conv layer i (with its LayerNorm, if any) of a channels-last span x (T, C_in)."""
        layer = self.hf.conv_layers[i]
        x = strided_conv(x, layer.conv, self.flat_weights[i])
        norm = getattr(layer, "layer_norm", None)
        return x if norm is None else norm(x)  # LayerNorm over channels: the last dimension here

    def tile(self, x: torch.Tensor, first, f0: int, f1: int) -> torch.Tensor:
        """Output frames [f0, f1) of the last layer, (f1 - f0, C), from input x (samples,)."""
        # The samples they need: frames [a, b) of a layer read frames [a*s, (b-1)*s + k) below it.
        a, b = f0, f1
        for k, s in zip(reversed(self.kernels), reversed(self.strides)):
            a, b = a * s, (b - 1) * s + k
        h = activate(self.hf.conv_layers[0].activation, first(x[a:b, None]))
        for i in range(1, len(self.kernels)):
            h = activate(self.hf.conv_layers[i].activation, self.conv(i, h))
        return h


def is_exact_gelu(activation) -> bool:
    """Whether a module is the exact (erf) GELU: transformers' GELUActivation or nn.GELU."""
    return getattr(activation, "act", None) is nn.functional.gelu or (
        type(activation) is nn.GELU and activation.approximate == "none")


def activate(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """activation(x), in place when it is exact GELU: x is always a fresh conv output here, and
    these are the largest tensors of the model (512 x 3,200 per second of audio after the first
    conv). A new output for each cost a pass of page faults: in place, a bf16 wav2vec2-base forward
    on 2 CPU cores ran 1.06x faster (paired A/B), bit-identical."""
    return torch.ops.aten.gelu_(x) if is_exact_gelu(activation) else activation(x)


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
    """conv(x) for one channels-last input x (T, C_in) -> (T_out, C_out), in the dtype of w, the
    conv's flat_weight().

    The windows overlap (k > s), so one matmul over windows() would make the BLAS copy them out
    first (1.5x the input for k=3, s=2: ~10% of the encoder's time). Instead the taps go in groups
    of s: taps [j*s, j*s + s) of every window are row j + r of the input read as non-overlapping
    frames of s samples, a plain strided view, and the conv is the sum over the ceil(k/s) groups
    of frames @ weight rows (2 matmuls for wav2vec2's k=3, s=2 and k=2, s=2: 1)."""
    k, s = conv.kernel_size[0], conv.stride[0]
    x = x.to(w.dtype).contiguous()
    t, c_in = x.shape
    t_out = (t - k) // s + 1
    out = torch.empty(t_out, w.shape[1], dtype=w.dtype, device=x.device)
    for j in range(0, k, s):
        taps = min(s, k - j)  # the last group may hold fewer than s taps
        frames = x.as_strided((t_out, taps * c_in), (s * c_in, 1), x.storage_offset() + j * c_in)
        rows = w[j * c_in : (j + taps) * c_in]
        if j == 0:
            if conv.bias is None:
                torch.mm(frames, rows, out=out)
            else:
                torch.addmm(conv.bias, frames, rows, out=out)
        else:
            out.addmm_(frames, rows)
    return out


def channel_norm(x: torch.Tensor, n: int, conv: nn.Conv1d, w: torch.Tensor, norm: nn.GroupNorm):
    """GroupNorm (one group per channel, or one group of all channels) of conv(x), as a matmul with
    per-channel scaled weights: returns the function that computes it on any span of x's samples
    (windows aligned with x's).

    The conv is linear in its windows X (T_out, K): y = X @ W + b. So each channel's mean over
    time is mean(X) @ W + b, and with the windows centred, Xc = X - mean(X), the norm is
    (y - mean_y) * scale + beta = Xc @ (W * scale) + beta, where each channel's variance is
    diag(W' Cov W) from the K x K covariance of the windows: no pass over the (T_out, C_out)
    output before the one that writes it. (Those activations are 100x the waveform at the first
    layer, and group_norm over them cost 15x the conv here.) Centring the windows, not the output,
    also avoids cancelling a large channel mean. The statistics are float64 (a K x K covariance
    costs nothing; float32 sums over ~10^5 windows were 10x less exact than group_norm's), the
    matmul is in the weights' dtype; w is the conv's flat_weight(). x: one channels-last input
    (T, C_in); n: its real samples, the statistics are taken over the windows inside them.
    """
    k, s = conv.kernel_size[0], conv.stride[0]
    dtype = w.dtype
    w = w.double()
    real = windows(x[:n].double(), k, s)
    mean = real.mean(0)
    centered = real - mean
    var = ((centered.T @ centered / len(real)) @ w * w).sum(0)  # diag(W' Cov W): each channel's over time
    offset = 0.0  # one group per channel: the conv bias cancels against the channel mean
    if norm.num_groups == 1:
        # One group of all channels (wav2vec 1.0): its variance adds the spread of the channel means
        # around their average, and each channel keeps its mean's offset from that average.
        channel_mean = mean @ w + (conv.bias.double() if conv.bias is not None else 0.0)
        offset = channel_mean - channel_mean.mean()
        var = (var + offset**2).mean()
    scale = norm.weight.double() * torch.rsqrt(var + norm.eps)
    scaled, beta = (w * scale).to(dtype), (norm.bias.double() + offset * scale).to(dtype)
    return lambda span: torch.addmm(beta, (windows(span.double(), k, s) - mean).to(dtype), scaled)


def use_channels_last_feature_encoder(model: nn.Module, tile_frames: int | None = TILE_FRAMES) -> bool:
    """Swap a wav2vec2-style model's feature encoder for ChannelsLastFeatureEncoder when every
    layer is of a supported kind (else leave it). Returns whether it was swapped."""
    encoder = getattr(model, "feature_extractor", None)
    layers = getattr(encoder, "conv_layers", None)
    if layers is None or not all(supported_layer(layer) for layer in layers):
        return False
    model.feature_extractor = ChannelsLastFeatureEncoder(encoder, tile_frames)
    return True
