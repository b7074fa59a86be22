"""Our LTX-Video VAE against diffusers' AutoencoderKLLTXVideo (random weights, every neutral
parameter perturbed) for the three decoder generations; exact streaming of the non-causal
decoder with latency; checkpoints in the original single-file and diffusers layouts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    LTX_LATENT,
    diffusers_to_ltx_original,
    ltx_original_config,
    ltx_reference_decode,
    perturbed_ltx_vae,
)
from safetensors.torch import save_file

from flashvaed.errors import CheckpointError, InputError
from flashvaed.models import load_model, save_teacher
from flashvaed.models.families.ltx import LTXVAE, LTXConfig
from flashvaed.models.streaming import iter_decode, mix_decode_noise

GENERATIONS = ["0.9.0", "0.9.1", "0.9.5"]


@pytest.fixture(scope="module", params=GENERATIONS)
def pair(request, tmp_path_factory):
    ref = perturbed_ltx_vae(request.param, seed=GENERATIONS.index(request.param))
    path = tmp_path_factory.mktemp("ltx") / request.param
    ref.save_pretrained(path)
    return request.param, ref, load_model(path)


def raw_decode(model, latents, chunk, **options):
    """Unclamped frames through the stream loop (diffusers' decoder does not clamp)."""
    return torch.cat(list(iter_decode(model, latents, chunk, clamp=False, **options)), dim=2)


def options(generation, timestep=0.05, seed=0):
    return {} if generation == "0.9.0" else {"timestep": timestep, "seed": seed}


def test_generation_detected_from_the_checkpoint(pair):
    generation, ref, ours = pair
    assert isinstance(ours, LTXVAE) and ours.family == "ltx"
    assert ours.config.generation == generation
    assert (ours.latent_channels, ours.spatial_factor, ours.temporal_factor) == (LTX_LATENT, 32, 8)
    conditioned = generation != "0.9.0"
    assert ("timestep" in ours.step_inputs) == conditioned
    assert ("noise" in ours.step_inputs) == (generation == "0.9.1")
    if conditioned:  # read from the checkpoint, never assumed
        assert float(ours.decoder.timestep_scale_multiplier.detach()) == 700.0
    torch.testing.assert_close(ours.latents_mean.flatten(), ref.latents_mean)
    torch.testing.assert_close(ours.latents_std.flatten(), ref.latents_std)


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_decode_matches_diffusers(pair, frames):
    generation, ref, ours = pair
    torch.manual_seed(frames)
    latents = torch.randn(2, LTX_LATENT, frames, 2, 3)
    timestep = torch.tensor([0.05, 0.4])
    expected = ltx_reference_decode(ref, latents, None if generation == "0.9.0" else timestep, seed=11)
    got = raw_decode(ours, latents, 2, **options(generation, timestep, seed=11))
    assert got.shape == expected.shape == (2, 3, 1 + 8 * (frames - 1), 64, 96)
    assert expected.std() > 0.05, "outputs are nearly constant: the comparison would be weak"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_noise_injection_is_drawn_per_stream_from_the_seed(pair):
    generation, ref, ours = pair
    if generation != "0.9.1":
        pytest.skip("only 0.9.1 injects noise")
    latents = torch.randn(1, LTX_LATENT, 3, 2, 2)
    a = raw_decode(ours, latents, 1, timestep=0.05, seed=3)
    torch.testing.assert_close(raw_decode(ours, latents, 3, timestep=0.05, seed=3), a, atol=1e-5, rtol=0)
    assert (raw_decode(ours, latents, 1, timestep=0.05, seed=4) - a).abs().max() > 1e-3
    torch.testing.assert_close(a, ltx_reference_decode(ref, latents, 0.05, seed=3), atol=1e-4, rtol=0)


@pytest.mark.parametrize("frames", [9, 17])
def test_encode_matches_diffusers(pair, frames):
    _, ref, ours = pair
    torch.manual_seed(frames)
    video = torch.rand(1, 3, frames, 64, 96) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(video).latent_dist.mean
        mean, std = ref.latents_mean.view(1, -1, 1, 1, 1), ref.latents_std.view(1, -1, 1, 1, 1)
        got = ours.encode(video)  # normalised with the checkpoint's statistics
    assert got.shape == expected.shape == (1, LTX_LATENT, 1 + (frames - 1) // 8, 2, 3)
    torch.testing.assert_close(got, (expected - mean) / std, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_any_chunking_equals_one_shot(pair, chunk):
    generation, _, ours = pair
    latents = torch.randn(1, LTX_LATENT, 6, 2, 2)
    one_shot = raw_decode(ours, latents, 5, **options(generation))
    torch.testing.assert_close(raw_decode(ours, latents, chunk, **options(generation)), one_shot, atol=1e-5, rtol=0)


def test_a_stream_holds_frames_back_by_its_declared_latency(pair):
    generation, _, ours = pair
    assert ours.latency > 0 and ours.output_offset > 0  # a non-causal decoder cannot be causal
    latents = torch.randn(1, LTX_LATENT, ours.latency + 4, 2, 2)
    expected = raw_decode(ours, latents, 4, **options(generation))
    stream = ours.stream(clamp=False, **options(generation))
    pieces = [stream.push(latents[:, :, :1])]
    assert pieces[0].shape[2] == 0, "the first frame needs latent frames that have not arrived"
    for start in range(1, latents.shape[2]):
        pieces.append(stream.push(latents[:, :, start : start + 1]))
    # once ``latency`` more latent frames arrived, frames flow at the steady rate
    assert [p.shape[2] for p in pieces[ours.latency + 1 :]] == [8] * (latents.shape[2] - ours.latency - 1)
    pieces.append(stream.close())
    torch.testing.assert_close(torch.cat(pieces, dim=2), expected, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="not started"):
        stream.close()


def test_saved_state_resumes_in_another_stream(pair):
    generation, _, ours = pair
    latents = torch.randn(1, LTX_LATENT, 5, 2, 2)
    expected = raw_decode(ours, latents, 1, **options(generation))
    a = ours.stream(clamp=False, **options(generation))
    head = a.push(latents[:, :, :3])
    b = ours.stream(clamp=False, **options(generation))
    b.load_state(a.save_state())
    tail = torch.cat([b.push(latents[:, :, 3:]), b.close()], dim=2)
    torch.testing.assert_close(torch.cat([head, tail], dim=2), expected, atol=1e-5, rtol=0)


def test_original_single_file_layout(pair, tmp_path):
    generation, ref, _ = pair
    state = diffusers_to_ltx_original(ref.state_dict(), generation)
    # what real all-in-one files also carry: the other statistics and the transformer's tensors
    state["vae.per_channel_statistics.channel"] = torch.arange(LTX_LATENT, dtype=torch.float32)
    state["vae.per_channel_statistics.mean-of-stds"] = torch.ones(LTX_LATENT)
    state["model.diffusion_model.proj_in.weight"] = torch.zeros(4, 4)
    path = tmp_path / "ltx-video-tiny.safetensors"
    metadata = {"config": json.dumps({"vae": ltx_original_config(generation), "transformer": {}})}
    save_file(state, str(path), metadata=metadata)
    ours = load_model(path)
    assert ours.config.generation == generation
    latents = torch.randn(1, LTX_LATENT, 3, 2, 2)
    expected = ltx_reference_decode(ref, latents, None if generation == "0.9.0" else 0.05, seed=5)
    torch.testing.assert_close(raw_decode(ours, latents, 2, **options(generation, seed=5)), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["original", "diffusers", "flashvaed"])
def test_round_trip_through_every_layout(pair, layout, tmp_path):
    generation, _, ours = pair
    path = tmp_path / ("vae" if layout == "diffusers" else "vae.safetensors")
    back = load_model(save_teacher(ours, path, layout=layout))
    assert back.config == ours.config
    latents = torch.randn(1, LTX_LATENT, 2, 2, 2)
    torch.testing.assert_close(
        raw_decode(back, latents, 1, **options(generation)), raw_decode(ours, latents, 1, **options(generation))
    )


def test_released_configs_and_their_latency():
    latency = {}
    for generation in ("0.9.0", "0.9.1", "0.9.5"):
        with torch.device("meta"):
            vae = LTXVAE(LTXConfig.released(generation))
        assert vae.decoder.layout.middle.width == (512 if generation == "0.9.0" else 1024)
        latency[generation] = vae.latency
    assert all(v > 10 for v in latency.values()), latency  # many symmetric convs: tens of latent frames


def test_spatial_padding_mode_is_honoured(tmp_path):
    ref = perturbed_ltx_vae("0.9.5", seed=9)
    for conv in ref.modules():  # diffusers hard-codes zeros: make it the oracle of a reflect model
        if isinstance(conv, torch.nn.Conv3d) and conv.padding != (0, 0, 0):
            conv.padding_mode = "reflect"
            conv._reversed_padding_repeated_twice = [p for p in reversed(conv.padding) for _ in range(2)]
    config = ltx_original_config("0.9.5") | {"spatial_padding_mode": "reflect"}
    path = tmp_path / "reflect.safetensors"
    save_file(diffusers_to_ltx_original(ref.state_dict(), "0.9.5"), str(path), {"config": json.dumps({"vae": config})})
    ours = load_model(path)
    assert ours.config.spatial_padding_mode == "reflect"
    latents = torch.randn(1, LTX_LATENT, 2, 2, 3)
    expected = ltx_reference_decode(ref, latents, 0.05)
    torch.testing.assert_close(raw_decode(ours, latents, 1, timestep=0.05), expected, atol=1e-4, rtol=0)


def test_options_that_do_not_apply_are_refused(pair):
    generation, _, ours = pair
    latents = torch.randn(1, LTX_LATENT, 2, 2, 2)
    if generation == "0.9.0":
        with pytest.raises(InputError, match="not timestep-conditioned"):
            ours.decode(latents, timestep=0.05)
    else:
        with pytest.raises(InputError, match="timestep must be one finite number"):
            ours.decode(latents, timestep=float("nan"))
    with pytest.raises(InputError, match="takes the options timestep, seed, generator"):
        ours.decode(latents, temperature=1.0)
    with pytest.raises(InputError, match="seed must be a non-negative integer"):
        ours.decode(latents, seed=-1)


def test_decode_noise_mixing_is_per_frame_and_seeded():
    latents = torch.randn(1, LTX_LATENT, 4, 2, 2)
    a = mix_decode_noise(latents, 0.025, seed=0)
    torch.testing.assert_close(mix_decode_noise(latents, 0.025, seed=0), a)
    assert (a - latents).abs().max() > 1e-3
    torch.testing.assert_close(mix_decode_noise(latents[:, :, :2], 0.025, seed=0), a[:, :, :2])  # frame by frame
    torch.testing.assert_close(mix_decode_noise(latents, 0.0, seed=0), latents)
    with pytest.raises(InputError, match="decode_noise_scale must be in"):
        mix_decode_noise(latents, -0.1, seed=0)


def test_bad_configs_are_refused(tmp_path):
    ref = perturbed_ltx_vae("0.9.1", seed=2)
    state = diffusers_to_ltx_original(ref.state_dict(), "0.9.1")
    for bad, message in [
        ({"decoder_blocks": [["res_x", 1], ["attn_res_x", {"num_layers": 1}]]}, "not supported"),
        ({"norm_layer": "group_norm"}, "pixel_norm"),
        ({"latent_channels": 10**9}, "latent_channels"),
        ({"decoder_blocks": "res_x"}, "list of 1 to 64 blocks"),
    ]:
        path = tmp_path / "bad.safetensors"
        config = ltx_original_config("0.9.1") | bad
        save_file(state, str(path), {"config": json.dumps({"vae": config})})
        with pytest.raises(CheckpointError, match=message):
            load_model(path)
    path = tmp_path / "no-config.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="needs its VAE configuration"):
        load_model(path)


def test_one_shot_form_equals_the_stream_and_diffusers(pair):
    """``decode_clip`` (what calibration and distillation run) is upstream's one-shot decode."""
    generation, ref, ours = pair
    latents = torch.randn(1, LTX_LATENT, 4, 2, 3)
    with torch.no_grad():
        got = ours.decode_clip(latents, clamp=False, **options(generation, seed=2))
    torch.testing.assert_close(got, raw_decode(ours, latents, 2, **options(generation, seed=2)), atol=1e-5, rtol=0)
    expected = ltx_reference_decode(ref, latents, None if generation == "0.9.0" else 0.05, seed=2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_config_that_widens_without_bound_is_refused(tmp_path):
    ref = perturbed_ltx_vae("0.9.0", seed=4)
    state = diffusers_to_ltx_original(ref.state_dict(), "0.9.0")
    config = ltx_original_config("0.9.0")
    config["encoder_blocks"] = [["res_x", 1]] + [["res_x_y", {"multiplier": 8}]] * 30 + [["res_x", 1]]
    path = tmp_path / "wide.safetensors"
    save_file(state, str(path), {"config": json.dumps({"vae": config})})
    with pytest.raises(CheckpointError, match="widen the network past 16384 channels"):
        load_model(path)
