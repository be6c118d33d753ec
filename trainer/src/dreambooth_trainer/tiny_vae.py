"""The tiny model's VAE: a real `AutoencoderKL` whose weights are set by hand to a near-lossless 2x colour codec.

A randomly initialised VAE decodes every latent to the same grey noise, so a tiny model built with one can never show
a sample that looks like anything, however well its UNet learns. Training a VAE takes minutes. This one is built in
microseconds instead: the encoder averages each 2x2 block of pixels into the latent's first three channels (R, G, B,
and their mean in the fourth), and the decoder copies each latent pixel back to its 2x2 block. Decoded samples are
therefore the UNet's output at 16x16, upscaled, which is what makes the embedded demo's sample grid readable.

How the weights get through the architecture unchanged:
- every ResNet block is an identity (its second convolution is zero, so only the skip path remains), and so is the
  mid-block attention (its output projection is zero; the residual path remains);
- the down-sampler is a 2x2 mean and the up-sampler a nearest-neighbour copy (the convolution after it is identity);
- the only non-linear step left is GroupNorm + SiLU before each `conv_out`. The channels run in groups of four,
  `[x, -x, K, -K]` per colour: the group's mean is exactly zero and its variance is (mean(x^2) + K^2) / 2, which for
  a large constant K is K^2 / 2 to within 0.2 %, so the norm is a fixed scaling. `conv_out` then reads
  `silu(x) - silu(-x)`, which is exactly `x`.
"""

from __future__ import annotations

import math
from typing import Any

# Channels per colour group: x, -x, +K, -K.
GROUP = 4
COLOURS = 3
LATENT_CHANNELS = 4
WIDTH = GROUP * COLOURS
# The constant that makes GroupNorm's variance nearly independent of the image (see the module docstring).
K = 16.0
# DiagonalGaussianDistribution clamps log-variance at -30: sampling the latent adds noise of std e^-15.
LOG_VARIANCE = -30.0


def vae_config(resolution: int) -> dict[str, Any]:
    return {
        "sample_size": resolution,
        "in_channels": COLOURS,
        "out_channels": COLOURS,
        "block_out_channels": [WIDTH, WIDTH],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": LATENT_CHANNELS,
        "layers_per_block": 1,
        "norm_num_groups": COLOURS,
        # Latents are pixel means in [-1, 1] (std about 0.5 on typical images); 1.5 brings them near unit scale.
        "scaling_factor": 1.5,
    }


def set_codec_weights(vae: Any) -> None:
    """Overwrite every parameter of a `vae_config()` AutoencoderKL with the hand-set codec (see the docstring)."""
    import torch

    state = {name: torch.zeros_like(p) for name, p in vae.state_dict().items()}
    centre = (1, 1)

    def identity_conv(name: str) -> None:
        w = state[f"{name}.weight"]
        for ch in range(w.shape[0]):
            w[ch, ch, centre[0], centre[1]] = 1.0

    def split_colours(name: str, scale: float) -> None:
        """A 3x3 conv from colour (or latent) channels to the [x, -x, K, -K] groups (centre tap only)."""
        w, b = state[f"{name}.weight"], state[f"{name}.bias"]
        for c in range(COLOURS):
            w[GROUP * c, c, centre[0], centre[1]] = scale
            w[GROUP * c + 1, c, centre[0], centre[1]] = -scale
            b[GROUP * c + 2] = K
            b[GROUP * c + 3] = -K

    def norm_out(name: str) -> None:
        """GroupNorm that undoes its own normalisation on the x channels and silences the constants."""
        gamma = state[f"{name}.weight"]
        for c in range(COLOURS):
            gamma[GROUP * c] = gamma[GROUP * c + 1] = K / math.sqrt(2.0)

    def merge_colours(name: str, rows: list[list[float]]) -> None:
        """conv_out: output o = sum_c rows[o][c] * (silu(x_c) - silu(-x_c))."""
        w = state[f"{name}.weight"]
        for o, row in enumerate(rows):
            for c, coeff in enumerate(row):
                w[o, GROUP * c, centre[0], centre[1]] = coeff
                w[o, GROUP * c + 1, centre[0], centre[1]] = -coeff

    for name, p in vae.state_dict().items():
        if name.endswith(("norm1.weight", "norm2.weight", "group_norm.weight")):
            state[name] = torch.ones_like(p)  # unused (their paths are zeroed), but kept well-formed
    split_colours("encoder.conv_in", 1.0)
    for name, w in state.items():
        if ".downsamplers.0.conv.weight" in name:
            for ch in range(w.shape[0]):
                w[ch, ch, 0:2, 0:2] = 0.25  # with the encoder's (0, 1, 0, 1) padding and stride 2: a 2x2 mean
        if ".upsamplers.0.conv.weight" in name:
            identity_conv(name.removesuffix(".weight"))
    norm_out("encoder.conv_norm_out")
    merge_colours("encoder.conv_out", [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]])
    state["encoder.conv_out.bias"][LATENT_CHANNELS:] = LOG_VARIANCE
    for c in range(2 * LATENT_CHANNELS):
        state["quant_conv.weight"][c, c, 0, 0] = 1.0
    for c in range(LATENT_CHANNELS):
        state["post_quant_conv.weight"][c, c, 0, 0] = 1.0
    split_colours("decoder.conv_in", 1.0)
    norm_out("decoder.conv_norm_out")
    merge_colours("decoder.conv_out", [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    vae.load_state_dict(state)
