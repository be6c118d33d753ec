"""The tiny model's hand-set VAE is a 2x colour codec: decode(encode(x)) is x averaged over 2x2 blocks."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from dreambooth_trainer.tiny import TINY_RESOLUTION, VAE_CONFIG
from dreambooth_trainer.tiny_vae import set_codec_weights


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Blocky random images in [-1, 1]: flat 2x2 blocks, a random background and a bright square."""
    g = torch.Generator().manual_seed(seed)
    half = TINY_RESOLUTION // 2
    blocks = torch.rand(n, 3, half, half, generator=g) * 2 - 1
    blocks[:, :, 4:10, 4:10] = 0.9
    return torch.nn.functional.interpolate(blocks, scale_factor=2, mode="nearest")


def _codec() -> AutoencoderKL:
    vae = AutoencoderKL(**VAE_CONFIG)
    set_codec_weights(vae)
    return vae.eval()


@torch.no_grad()
def test_block_images_round_trip_through_latents_almost_exactly() -> None:
    x = _images(4)
    vae = _codec()
    latents = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(1))
    assert latents.shape == (4, 4, TINY_RESOLUTION // 2, TINY_RESOLUTION // 2)
    # the first three channels are the colours at half resolution, the fourth their mean
    pooled = torch.nn.functional.avg_pool2d(x, 2)
    assert torch.allclose(latents[:, :3], pooled, atol=5e-3)
    assert torch.allclose(latents[:, 3], pooled.mean(1), atol=5e-3)
    decoded = vae.decode(latents).sample
    assert torch.nn.functional.mse_loss(decoded, x).item() < 1e-5


@torch.no_grad()
def test_smooth_images_lose_only_what_2x_downsampling_loses() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=g) * 2 - 1
    ideal = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
    decoded = _codec().decode(_codec().encode(x).latent_dist.mode()).sample
    assert (decoded - ideal).abs().max().item() < 1e-2


@torch.no_grad()
def test_a_random_vae_would_not_reconstruct() -> None:
    """The reason the codec exists: the same architecture with its random initial weights loses the image."""
    x = _images(2)
    torch.manual_seed(0)
    random_vae = AutoencoderKL(**VAE_CONFIG).eval()
    random_error = torch.nn.functional.mse_loss(random_vae.decode(random_vae.encode(x).latent_dist.mode()).sample, x)
    codec = _codec()
    codec_error = torch.nn.functional.mse_loss(codec.decode(codec.encode(x).latent_dist.mode()).sample, x)
    assert codec_error.item() * 1000 < random_error.item()
