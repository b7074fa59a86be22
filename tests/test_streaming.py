"""The streaming contract: chunked == one-shot, streams independent, state explicit and fixed."""

from __future__ import annotations

import pytest
import torch

from flashvaed.errors import InputError
from flashvaed.models import StreamingDecoder, zero_state
from flashvaed.models.streaming import chunk_bounds, iter_decode


@pytest.fixture(scope="module")
def latents():
    torch.manual_seed(0)
    return torch.randn(2, 16, 7, 3, 4)


@pytest.fixture(scope="module")
def one_shot(teacher_8, latents):
    with torch.no_grad():
        return teacher_8.decode(latents)  # first frame, then all six others in one step


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 6])
def test_every_chunking_equals_one_shot(teacher_8, latents, one_shot, chunk):
    got = teacher_8.decode(latents, chunk=chunk)
    assert got.shape == (2, 3, 25, 24, 32)
    torch.testing.assert_close(got, one_shot, atol=1e-5, rtol=0)


def test_irregular_pushes_equal_one_shot(teacher_8, latents, one_shot):
    """A stream fed 3, then 1, then 3 latent frames (the first push holds the first chunk too)."""
    stream = StreamingDecoder(teacher_8)
    pieces = [stream.push(latents[:, :, a:b]) for a, b in [(0, 3), (3, 4), (4, 7)]]
    assert [p.shape[2] for p in pieces] == [1 + 4 * 2, 4, 12]
    torch.testing.assert_close(torch.cat(pieces, dim=2), one_shot, atol=1e-5, rtol=0)


def test_interleaved_streams_are_bit_identical(teacher_8):
    torch.manual_seed(1)
    a, b = torch.randn(1, 16, 5, 3, 4), torch.randn(1, 16, 5, 3, 4)
    alone_a = torch.cat(list(iter_decode(teacher_8, a, 1)), dim=2)
    alone_b = torch.cat(list(iter_decode(teacher_8, b, 1)), dim=2)
    sa, sb = StreamingDecoder(teacher_8), StreamingDecoder(teacher_8)
    got_a, got_b = [], []
    for i in range(5):
        got_a.append(sa.push(a[:, :, i : i + 1]))
        got_b.append(sb.push(b[:, :, i : i + 1]))
    assert torch.equal(torch.cat(got_a, dim=2), alone_a)
    assert torch.equal(torch.cat(got_b, dim=2), alone_b)


def test_state_is_a_fixed_shape_tuple_described_by_specs(teacher_8):
    specs = teacher_8.decoder_state_specs()
    assert len(specs) == 32  # conv_in, 4 middle, 3x(6 + time_conv) ... see docs/architecture.md
    assert len({s.name for s in specs}) == len(specs)
    state = zero_state(specs, 2, 3, 4)
    expected = [s.shape(2, 3, 4) for s in specs]
    with torch.no_grad():
        _, state = teacher_8.decode_step(torch.randn(2, 16, 1, 3, 4), state, first=True)
        assert isinstance(state, tuple) and [tuple(t.shape) for t in state] == expected
        for k in (1, 3):
            _, state = teacher_8.decode_step(torch.randn(2, 16, k, 3, 4), state)
            assert isinstance(state, tuple) and [tuple(t.shape) for t in state] == expected


def test_state_tensors_are_compact(teacher_8):
    """New state does not keep the whole (history + chunk) buffer alive."""
    state = zero_state(teacher_8.decoder_state_specs(), 1, 3, 4)
    with torch.no_grad():
        _, state = teacher_8.decode_step(torch.randn(1, 16, 1, 3, 4), state, first=True)
        _, state = teacher_8.decode_step(torch.randn(1, 16, 5, 3, 4), state)
    for t in state:  # dense in the layout it was computed in (channels-last in eager CPU runs)
        dense = t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d)
        assert dense and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_model_is_pure(teacher_8):
    """Same (latents, state) in, same output out, whatever ran in between."""
    state = zero_state(teacher_8.decoder_state_specs(), 1, 3, 4)
    z0, z1 = torch.randn(1, 16, 1, 3, 4), torch.randn(1, 16, 2, 3, 4)
    with torch.no_grad():
        _, s1 = teacher_8.decode_step(z0, state, first=True)
        y1, _ = teacher_8.decode_step(z1, s1)
        teacher_8.decode_step(torch.randn(1, 16, 3, 3, 4), s1)  # another use of the same state
        y2, _ = teacher_8.decode_step(z1, s1)
    assert torch.equal(y1, y2)


def test_first_step_must_be_one_frame(teacher_8):
    state = zero_state(teacher_8.decoder_state_specs(), 1, 3, 4)
    with pytest.raises(InputError, match="one latent frame"):
        teacher_8.decode_step(torch.randn(1, 16, 2, 3, 4), state, first=True)


def test_stream_refuses_a_chunk_of_another_size(teacher_8):
    stream = StreamingDecoder(teacher_8)
    stream.push(torch.randn(1, 16, 1, 3, 4))
    with pytest.raises(InputError, match="started with"):
        stream.push(torch.randn(1, 16, 1, 4, 4))


def test_chunk_bounds():
    assert chunk_bounds(1, 4) == [(0, 1)]
    assert chunk_bounds(6, 2) == [(0, 1), (1, 3), (3, 5), (5, 6)]
    with pytest.raises(InputError):
        chunk_bounds(3, 0)


def test_encoder_yields_one_latent_frame_per_chunk(teacher_8):
    video = torch.rand(1, 3, 13, 16, 24) * 2 - 1
    with torch.no_grad():
        pieces = list(teacher_8.iter_encode(video))
        whole = teacher_8.encode(video)
    assert [p.shape[2] for p in pieces] == [1, 1, 1, 1]
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, atol=0, rtol=0)
