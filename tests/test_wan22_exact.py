"""Our Wan2.2 (TI2V-5B) VAE against diffusers' AutoencoderKLWan configured as Wan2.2 (random
weights, same numbers); streaming; checkpoints in every layout; the released configuration."""

from __future__ import annotations

import pytest
import torch
from conftest import diffusers_to_wan22_original, latent_stats, perturbed_wan22_vae
from safetensors.torch import save_file

from flashvaed.errors import CheckpointError
from flashvaed.models import StreamingDecoder, Wan22Config, Wan22VAE, load_model, save_teacher, zero_state
from flashvaed.models.checkpoint import layout_names
from flashvaed.models.families.wan22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, patchify, unpatchify
from flashvaed.models.streaming import iter_decode


@pytest.fixture(scope="module", params=[(8, 12), (12, 8)], ids=["base8-dec12", "base12-dec8"])
def pair(request, tmp_path_factory):
    base, dec = request.param
    ref = perturbed_wan22_vae(base, dec, seed=base + dec)
    path = tmp_path_factory.mktemp("pair22") / "vae"
    ref.save_pretrained(path)
    return ref, load_model(path)


def test_loaded_as_wan22_with_its_widths(pair):
    ref, ours = pair
    assert isinstance(ours, Wan22VAE) and ours.family == "wan2.2"
    c = ours.config
    assert (c.base_dim, c.decoder_dim, c.z_dim, c.patch_size) == (
        ref.config.base_dim,
        ref.config.decoder_base_dim,
        48,
        2,
    )
    assert (ours.latent_channels, ours.spatial_factor, ours.temporal_factor) == (48, 16, 4)


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_decode_matches_diffusers(pair, frames):
    ref, ours = pair
    torch.manual_seed(frames)
    latents = torch.randn(2, 48, frames, 2, 3)  # normalised diffusion-space latents
    mean, std = latent_stats(ref)
    with torch.no_grad():
        expected = ref.decode(latents * std + mean).sample  # diffusers takes de-normalised latents
        got = ours.decode(latents, chunk=1)
    assert got.shape == expected.shape == (2, 3, 1 + 4 * (frames - 1), 32, 48)
    assert (expected.abs() < 0.999).float().mean() > 0.8, "outputs saturate: the comparison would be weak"
    assert expected.std() > 0.05, "outputs are nearly constant: the comparison would be weak"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_raw_decoder_output_matches_frame_by_frame(pair):
    """Before the clamp and the unpatchify, chunk by chunk with diffusers' own feature cache."""
    ref, ours = pair
    latents = torch.randn(1, 48, 3, 2, 2)
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
        state = zero_state(ours.decoder_state_specs(), 1, 2, 2)
        outs = []
        for i in range(3):
            y, state = ours.decode_step(latents[:, :, i : i + 1], state, first=i == 0, clamp=False)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=2), unpatchify(expected, 2), atol=1e-4, rtol=0)


def test_output_is_clamped_like_the_reference(pair):
    ref, ours = pair
    latents = torch.randn(1, 48, 2, 2, 2)
    mean, std = latent_stats(ref)
    saved = ref.decoder.conv_out.weight.clone()
    with torch.no_grad():
        for model in (ref.decoder.conv_out, ours.decoder.head.conv):
            model.weight.mul_(50)
        try:
            expected = ref.decode(latents * std + mean).sample
            got = ours.decode(latents)
            raw, _ = ours.decode_step(latents[:, :, :1], zero_state(ours.decoder_state_specs(), 1, 2, 2), True, False)
        finally:
            ref.decoder.conv_out.weight.copy_(saved)
            ours.decoder.head.conv.weight.copy_(saved)
    assert raw.abs().max() > 1.5 and got.abs().max() <= 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(pair, frames):
    ref, ours = pair
    torch.manual_seed(100 + frames)
    video = torch.rand(2, 3, frames, 32, 48) * 2 - 1
    mean, std = latent_stats(ref)
    with torch.no_grad():
        expected = (ref.encode(video).latent_dist.mean - mean) / std
        got = ours.encode(video)
    assert got.shape == expected.shape == (2, 48, 1 + (frames - 1) // 4, 2, 3)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_patchify_is_column_major_inside_the_patch():
    """Planted fact from the reference: channel c*4 + r*2 + q holds row offset q, column offset r."""
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 1, 4, 6)
    p = patchify(x, 2)
    for c in range(2):
        for r in range(2):
            for q in range(2):
                assert torch.equal(p[0, c * 4 + r * 2 + q, 0], x[0, c, 0, q::2, r::2])
    assert torch.equal(unpatchify(p, 2), x)


# ---------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(pair):
    return pair[1]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(7)
    return torch.randn(2, 48, 6, 2, 3)


def test_every_chunking_equals_one_shot(teacher, clip):
    with torch.no_grad():
        one_shot = teacher.decode(clip)
        for chunk in (1, 2, 3, 4):
            torch.testing.assert_close(teacher.decode(clip, chunk=chunk), one_shot, atol=1e-5, rtol=0)
    stream = StreamingDecoder(teacher)
    pieces = [stream.push(clip[:, :, a:b]) for a, b in [(0, 2), (2, 3), (3, 6)]]
    assert [p.shape[2] for p in pieces] == [5, 4, 12]
    torch.testing.assert_close(torch.cat(pieces, dim=2), one_shot, atol=1e-5, rtol=0)


def test_interleaved_streams_are_bit_identical(teacher):
    torch.manual_seed(1)
    a, b = torch.randn(1, 48, 4, 2, 2), torch.randn(1, 48, 4, 2, 2)
    alone_a = torch.cat(list(iter_decode(teacher, a, 1)), dim=2)
    alone_b = torch.cat(list(iter_decode(teacher, b, 1)), dim=2)
    sa, sb = StreamingDecoder(teacher), StreamingDecoder(teacher)
    got_a, got_b = [], []
    for i in range(4):
        got_a.append(sa.push(a[:, :, i : i + 1]))
        got_b.append(sb.push(b[:, :, i : i + 1]))
    assert torch.equal(torch.cat(got_a, dim=2), alone_a)
    assert torch.equal(torch.cat(got_b, dim=2), alone_b)


def test_state_is_fixed_and_the_decoder_causal(teacher):
    """The state keeps its shapes; latent frame k > 0 changes output frames 1 + 4(k-1) on only."""
    specs = teacher.decoder_state_specs()
    state = zero_state(specs, 1, 2, 2)
    with torch.no_grad():
        for i, k in enumerate((1, 1, 3)):
            _, state = teacher.decode_step(torch.randn(1, 48, k, 2, 2), state, first=i == 0)
            assert [tuple(t.shape) for t in state] == [s.shape(1, 2, 2) for s in specs]
        z = torch.randn(1, 48, 5, 2, 2)
        base = teacher.decode(z)
        for k in (1, 4):
            moved = z.clone()
            moved[:, :, k] += 1.0
            diff = (teacher.decode(moved) - base).abs().amax(dim=(0, 1, 3, 4))
            first = 1 + 4 * (k - 1)
            assert diff[:first].max() == 0 and diff[first:].min() > 0, (k, diff)


# ---------------------------------------------------------------------------------------------
# checkpoints and the released configuration
# ---------------------------------------------------------------------------------------------
def _decodes_like(model, ref):
    latents = torch.randn(1, 48, 2, 2, 2)
    mean, std = latent_stats(ref)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(latents), ref.decode(latents * std + mean).sample, atol=1e-4, rtol=0)


def test_original_pth_layout(pair, tmp_path):
    ref, ours = pair
    original = diffusers_to_wan22_original(ref.state_dict())
    assert any(".upsamples.0.upsamples.3.time_conv." in k for k in original)
    assert set(layout_names(ours, "original").values()) == set(original)  # our key map agrees with the facts
    torch.save(original, tmp_path / "Wan2.2_VAE.pth")  # a plain state dict, as released
    model = load_model(tmp_path / "Wan2.2_VAE.pth")
    assert isinstance(model, Wan22VAE) and model.config == ours.config
    _decodes_like(model, ref)


def test_single_safetensors_in_each_layout(pair, tmp_path):
    ref, ours = pair
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "d.safetensors")
    save_file(diffusers_to_wan22_original(ref.state_dict()), tmp_path / "o.safetensors")
    save_teacher(ours, tmp_path / "f.safetensors")  # our names, family and config in the metadata
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "bare.safetensors")  # no metadata
    for name in ("d", "o", "f", "bare"):
        model = load_model(tmp_path / f"{name}.safetensors")
        assert model.family == "wan2.2" and model.config.decoder_dim == ours.config.decoder_dim, name
        _decodes_like(model, ref)


def test_writer_round_trips_every_layout(teacher, tmp_path):
    for layout, target in [("original", "a.pth"), ("diffusers", "b"), ("flashvaed", "c.safetensors")]:
        loaded = load_model(save_teacher(teacher, tmp_path / target, layout))
        assert loaded.config == teacher.config
        for (k, v), (k2, v2) in zip(teacher.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, v2)


def test_mixed_layouts_are_refused(pair, tmp_path):
    ref, _ = pair
    original = diffusers_to_wan22_original(ref.state_dict())
    with_wan21_key = {**original, "decoder.upsamples.7.time_conv.weight": torch.zeros(1)}
    with_diffusers_key = {
        **original,
        "decoder.conv_in.weight": torch.zeros(1),
        "decoder.norm_out.gamma": torch.zeros(1),
    }
    for name, state in (("a.pth", with_wan21_key), ("b.pth", with_diffusers_key)):
        torch.save(state, tmp_path / name)
        with pytest.raises(CheckpointError, match="mixes checkpoint layouts") as e:
            load_model(tmp_path / name)
        assert "\n" not in str(e.value)


def test_the_released_configuration_matches_diffusers_at_full_size():
    """TI2V-5B's VAE: key for key and shape for shape what diffusers builds from its Wan2.2 config."""
    from diffusers import AutoencoderKLWan

    from flashvaed.models.families import get

    family = get("wan2.2")
    with torch.device("meta"):
        ours = Wan22VAE(Wan22Config())
        ref = AutoencoderKLWan(**{k: v for k, v in family.diffusers_config(Wan22Config()).items() if k[0] != "_"})
    names = layout_names(ours, "diffusers")
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {names[k]: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    decoder = sum(p.numel() for p in ours.decoder.parameters())
    assert 550e6 < decoder < 560e6  # ~555 M decoder parameters
    assert (ours.latent_channels, ours.spatial_factor, ours.temporal_factor) == (48, 16, 4)
    assert ours.config.latents_mean[:3] == WAN22_LATENTS_MEAN[:3] == (-0.2289, -0.0052, -0.1323)
    assert ours.config.latents_std[:3] == WAN22_LATENTS_STD[:3] == (0.4765, 1.0364, 0.4514)
    assert len(ours.config.latents_mean) == len(ours.config.latents_std) == 48
