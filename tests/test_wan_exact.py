"""Our Wan2.1 VAE against diffusers' AutoencoderKLWan (random weights, same numbers)."""

from __future__ import annotations

import pytest
import torch
from conftest import latent_stats, perturbed_diffusers_vae

from flashvaed.models import load_model
from flashvaed.models.checkpoint import layout_names


@pytest.fixture(scope="module", params=[8, 16], ids=["base8", "base16"])
def pair(request, tmp_path_factory):
    ref = perturbed_diffusers_vae(request.param, seed=request.param)
    path = tmp_path_factory.mktemp("pair") / "vae"
    ref.save_pretrained(path)
    return ref, load_model(path)


@pytest.mark.parametrize("frames", [1, 2, 4])
def test_decode_matches_diffusers(pair, frames):
    ref, ours = pair
    torch.manual_seed(frames)
    latents = torch.randn(2, 16, frames, 3, 5)  # normalised diffusion-space latents
    mean, std = latent_stats(ref)
    with torch.no_grad():
        expected = ref.decode(latents * std + mean).sample  # diffusers takes de-normalised latents
        got = ours.decode(latents, chunk=1)
    assert got.shape == expected.shape == (2, 3, 1 + 4 * (frames - 1), 24, 40)
    assert (expected.abs() < 0.999).float().mean() > 0.8, "outputs saturate: the comparison would be weak"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_decode_unclamped_matches_diffusers_decoder(pair):
    """The raw decoder output (before the clamp) agrees too, frame by frame."""
    ref, ours = pair
    latents = torch.randn(1, 16, 3, 2, 3)
    mean, std = latent_stats(ref)
    with torch.no_grad():
        ref.clear_cache()
        x = ref.post_quant_conv(latents * std + mean)
        expected = torch.cat(
            [
                ref.decoder(x[:, :, i : i + 1], feat_cache=ref._feat_map, feat_idx=[0], first_chunk=i == 0)
                for i in range(3)
            ],
            dim=2,
        )
        specs = ours.decoder_state_specs()
        from flashvaed.models import zero_state

        state = zero_state(specs, 1, 2, 3)
        outs = []
        for i in range(3):
            y, state = ours.decode_step(latents[:, :, i : i + 1], state, first=i == 0, clamp=False)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=2), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(pair, frames):
    ref, ours = pair
    torch.manual_seed(100 + frames)
    video = torch.rand(2, 3, frames, 24, 32) * 2 - 1
    mean, std = latent_stats(ref)
    with torch.no_grad():
        expected = (ref.encode(video).latent_dist.mean - mean) / std
        got = ours.encode(video)
    assert got.shape == expected.shape == (2, 16, 1 + (frames - 1) // 4, 3, 4)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_original_layout_agrees_with_diffusers_converter(pair):
    """Our original-layout names map onto diffusers' names exactly as diffusers' own converter does."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ref, ours = pair
    names = layout_names(ours, "original")
    original = {names[k]: v for k, v in ours.state_dict().items()}
    assert any(k.startswith("decoder.upsamples.") for k in original)
    converted = convert_wan_vae_to_diffusers(original)
    expected = ref.state_dict()
    assert set(converted) == set(expected)
    for key, value in converted.items():
        assert torch.equal(value, expected[key]), key


def test_attention_scale_matters(pair):
    """Planted fact: perturbing attention weights changes the output (attention is really used)."""
    _, ours = pair
    latents = torch.randn(1, 16, 2, 3, 3)
    with torch.no_grad():
        before = ours.decode(latents, chunk=1)
        saved = ours.decoder.middle.blocks[1].proj.weight.clone()
        ours.decoder.middle.blocks[1].proj.weight.add_(0.5)
        after = ours.decode(latents, chunk=1)
        ours.decoder.middle.blocks[1].proj.weight.copy_(saved)
    assert (before - after).abs().max() > 1e-3
