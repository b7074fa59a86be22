"""Independent plain-torch re-implementations of the Flash-VAED release's students (our own code,
written from reading the release's ``models/wan/model_hybrid_aggressive.py`` and
``models/ltx/ltx_prune_1_4.py``): the oracle flashvaed's loader is tested against.

The modules carry the release's attribute names, so their ``state_dict()`` is a checkpoint in exactly
the release's key names and shapes. Nothing here imports flashvaed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the Wan2.1 latent statistics the release hard-codes in its WanVAE wrapper
WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Wan2.1 student: decodes one latent frame per call with a per-conv cache of its last two inputs
# ------------------------------------------------------------------------------------------------
class Gain(nn.Module):
    """RMS norm over channels (F.normalize * sqrt(C)) times ``gamma``."""

    def __init__(self, dim: int, dims: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * dims))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * x.shape[1] ** 0.5 * self.gamma


class Cached:
    """A causal temporal conv's cache: the last two input frames (zeros before the clip)."""

    def __init__(self) -> None:
        self.frames: Tensor | None = None

    def run(self, conv, x: Tensor, pad_hw: int) -> Tensor:
        front = self.frames if self.frames is not None else x.new_zeros(*x.shape[:2], 2, *x.shape[3:])
        joined = torch.cat([front, x], dim=2)
        self.frames = joined[:, :, -2:]
        return conv(F.pad(joined, (pad_hw,) * 4))


class DwSep(nn.Module):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.depthwise_conv = nn.Conv3d(cin, cin, k, groups=cin)
        self.pointwise_conv = nn.Conv3d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class WanBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            Gain(cin, 3),
            nn.SiLU(),
            DwSep(cin, cout, 3),
            Gain(cout, 3),
            nn.SiLU(),
            nn.Dropout(0.0),
            DwSep(cout, cout, 3),
        )
        self.shortcut = DwSep(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, caches: list[Cached]) -> Tensor:
        r = self.residual
        h = caches[0].run(r[2], F.silu(r[0](x)), 1)
        h = caches[1].run(r[6], F.silu(r[3](h)), 1)
        return h + (self.shortcut(x) if self.shortcut is not None else x)


class WanBlock2d(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            Gain(cin, 2), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            Gain(cout, 2), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B*T, C, H, W)
        return self.residual(x) + self.shortcut(x)


class WanAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = Gain(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B*T, C, H, W)
        n, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(n, 3 * c, h * w).transpose(1, 2).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, c, h, w)
        return x + self.proj(y)


class WanResample(nn.Module):
    def __init__(self, cin: int, cout: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(cin, cout, 3, padding=1)
        )
        self.time_conv = nn.Conv3d(cin, cin * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: Cached | None, first: bool) -> Tensor:
        b, c, t, h, w = x.shape
        if self.time_conv is not None and not first:
            y = cache.run(self.time_conv, x, 0)  # the first chunk left no cache: zeros in front
            x = torch.stack([y[:, :c], y[:, c:]], dim=3).reshape(b, c, 2 * t, h, w)
        t = x.shape[2]
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, -1, 2 * h, 2 * w).transpose(1, 2)


class WanDecoderRef(nn.Module):
    """The release's HybridDecoder3d at base width ``dim`` (96: 384/192/24/12 channels)."""

    def __init__(self, dim: int = 96, z: int = 16) -> None:
        super().__init__()
        top, half, s2, s3 = 4 * dim, 2 * dim, 2 * dim // 8, dim // 8
        self.conv1 = nn.Conv3d(z, top, 3)
        self.middle = nn.ModuleList([WanBlock3d(top, top), WanAttention(top), WanBlock3d(top, top)])
        self.upsamples = nn.ModuleList(
            [WanBlock3d(top, top) for _ in range(3)] + [WanResample(top, half, True)]
            + [WanBlock3d(half, top)] + [WanBlock3d(top, top) for _ in range(2)] + [WanResample(top, s2, True)]
            + [WanBlock2d(s2, s2) for _ in range(3)] + [WanResample(s2, s3, False)]
            + [WanBlock2d(s3, s3) for _ in range(3)]
        )  # fmt: skip
        self.head = nn.Sequential(Gain(s3, 3), nn.SiLU(), nn.Conv3d(s3, 3, 3))

    def forward(self, x: Tensor, caches: dict[str, Cached], first: bool) -> Tensor:
        def cache(name: str) -> Cached:
            return caches.setdefault(name, Cached())

        b = x.shape[0]
        x = cache("conv1").run(self.conv1, x, 1)
        x = self.middle[0](x, [cache("m0a"), cache("m0b")])
        t = x.shape[2]
        folded = self.middle[1](x.transpose(1, 2).reshape(b * t, *x.shape[1:2], *x.shape[3:]))
        x = folded.reshape(b, t, *folded.shape[1:]).transpose(1, 2)
        x = self.middle[2](x, [cache("m2a"), cache("m2b")])
        for i, layer in enumerate(self.upsamples):
            if isinstance(layer, WanBlock3d):
                x = layer(x, [cache(f"u{i}a"), cache(f"u{i}b")])
            elif isinstance(layer, WanResample):
                x = layer(x, cache(f"u{i}t") if layer.time_conv is not None else None, first)
            else:
                t = x.shape[2]
                y = layer(x.transpose(1, 2).reshape(b * t, *x.shape[1:2], *x.shape[3:]))
                x = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)
        return cache("head").run(self.head[2], F.silu(self.head[0](x)), 1)


class WanStudentRef(nn.Module):
    """``WanVAE_``'s state: ``conv1`` (the encoder's quant conv, unused), ``conv2``, the decoder."""

    def __init__(self, dim: int = 96, z: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2 * z, 2 * z, 1)
        self.conv2 = nn.Conv3d(z, z, 1)
        self.decoder = WanDecoderRef(dim, z)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """The release's loop on normalised latents: de-normalise, conv2, one latent frame per call
        (no cache reset: flashvaed decodes any length exactly), clamp."""
        z = latents.shape[1]
        mean = torch.tensor(WAN_MEAN).view(1, z, 1, 1, 1)
        std = torch.tensor(WAN_STD).view(1, z, 1, 1, 1)
        x = self.conv2(latents / (1.0 / std) + mean)
        caches: dict[str, Cached] = {}
        frames = [self.decoder(x[:, :, i : i + 1], caches, i == 0) for i in range(x.shape[2])]
        return torch.cat(frames, dim=2).clamp(-1, 1)


def randomize(module: nn.Module, seed: int, out_scale: float = 0.5) -> nn.Module:
    """Random weights with every gain and bias off its initial value."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma") or (name.endswith("weight") and p.dim() == 1):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in**0.5)
    return module.eval()


# ------------------------------------------------------------------------------------------------
# LTX-Video student (for a 0.9.0 teacher): one pass over the whole clip, on raw latents
# ------------------------------------------------------------------------------------------------
def pixel_norm(x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


def time_pad(x: Tensor, causal: bool) -> Tensor:
    """Replicate padding for a 3-tap temporal kernel: two first frames, or one first and one last."""
    if causal:
        return torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)
    return torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)


class Conv(nn.Module):
    """``LTXVideoCausalConv3d``: a ``conv`` child with spatial zero padding, time padded on call."""

    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, k, padding=(0, k // 2, k // 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(time_pad(x, False)) if self.conv.kernel_size[0] == 3 else self.conv(x)


class DepthwiseCausal(nn.Module):
    """``LTXVideoDepthwiseCausalConv3d``: always causal, depthwise with bias, then pointwise."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv3d(cin, cin, 3, padding=(0, 1, 1), groups=cin)
        self.pointwise = nn.Conv3d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(time_pad(x, True)))


class Frames2d(nn.Module):
    """Applies a Conv2d to every frame."""

    @staticmethod
    def run(conv: nn.Module, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = conv(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, -1, h, w).transpose(1, 2)


class LtxBlock(nn.Module):
    """A resnet of kind ``dw`` (depthwise causal), ``dense`` (non-causal 3D) or ``spatial`` (2D)."""

    def __init__(self, cin: int, cout: int, kind: str, force_shortcut: bool) -> None:
        super().__init__()
        self.kind = kind
        if kind == "dw":
            self.conv1, self.conv2 = DepthwiseCausal(cin, cout), DepthwiseCausal(cout, cout)
        elif kind == "dense":
            self.conv1, self.conv2 = Conv(cin, cout), Conv(cout, cout)
        else:
            self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.norm3 = self.conv_shortcut = None
        if cin != cout or force_shortcut:
            self.norm3 = nn.LayerNorm(cin, eps=1e-6)
            self.conv_shortcut = nn.Conv2d(cin, cout, 1) if kind == "spatial" else Conv(cin, cout, 1)

    def conv(self, layer: nn.Module, x: Tensor) -> Tensor:
        return Frames2d.run(layer, x) if self.kind == "spatial" else layer(x)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(self.conv1, F.silu(pixel_norm(x)))
        h = self.conv(self.conv2, F.silu(pixel_norm(h)))
        if self.norm3 is not None:
            x = self.conv(self.conv_shortcut, self.norm3(x.movedim(1, -1)).movedim(-1, 1))
        return h + x


class Upsampler(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv(channels, 8 * channels)

    def forward(self, x: Tensor) -> Tensor:
        b, _, t, h, w = x.shape
        y = self.conv(x).reshape(b, -1, 2, 2, 2, t, h, w)
        y = y.permute(0, 1, 5, 2, 6, 3, 7, 4).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return y[:, :, 1:]


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, upsample: bool, index: int) -> None:
        super().__init__()
        kind = "dw" if index < 2 else ("spatial" if index == 3 else "dense")
        forced = index >= 2
        self.conv_in = LtxBlock(cin, cout, "dense", forced) if cin != cout or forced else None
        self.upsamplers = nn.ModuleList([Upsampler(cout)]) if upsample else None
        self.resnets = nn.ModuleList([LtxBlock(cout, cout, kind, forced) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        if self.conv_in is not None:
            x = self.conv_in(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        for r in self.resnets:
            x = r(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, layers: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([LtxBlock(channels, channels, "dw", False) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        for r in self.resnets:
            x = r(x)
        return x


class LtxDecoderRef(nn.Module):
    """The release's LTXVideoDecoder3d: widths from the teacher's, those from up block 2 on / 4."""

    def __init__(self, latent: int, widths: list[int], layers: list[int], scaling: list[bool], patch: int) -> None:
        super().__init__()
        widths = [w if i < 2 else w // 4 for i, w in enumerate(reversed(widths))]
        layers, scaling = list(reversed(layers)), list(reversed(scaling))
        self.patch = patch
        self.conv_in = Conv(latent, widths[0])
        self.mid_block = MidBlock(widths[0], layers[0])
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks.append(UpBlock(cin, cout, layers[i + 1], scaling[i], i))
            cin = cout
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_out = Conv(cin, 3 * patch * patch)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        x = self.conv_out(F.silu(pixel_norm(x)))
        b, _, t, h, w = x.shape
        p = self.patch
        x = x.reshape(b, -1, 1, p, p, t, h, w).permute(0, 1, 5, 2, 6, 4, 7, 3)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def ltx_student_ref(config: dict, seed: int = 0) -> nn.Module:
    """The release's student for a diffusers 0.9.0-style teacher ``config``: the teacher's encoder
    (diffusers' own module, as the release's is), our decoder reference, the four statistics."""
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(seed)
    module = nn.Module()
    module.encoder = AutoencoderKLLTXVideo(**config).encoder
    z = config["latent_channels"]
    module.decoder = LtxDecoderRef(
        z,
        config["block_out_channels"],
        config["layers_per_block"],
        config["spatio_temporal_scaling"],
        config["patch_size"],
    )
    randomize(module, seed)
    module.register_buffer("latents_mean", 0.3 * torch.randn(z))
    module.register_buffer("latents_std", 0.5 + torch.rand(z))
    module.register_buffer("mean_of_means", torch.randn(z))
    module.register_buffer("std_of_means", torch.rand(z))
    return module.eval()


@torch.no_grad()
def ltx_decode(module: nn.Module, latents: Tensor) -> Tensor:
    """The release's decode on normalised latents: de-normalised by the file's statistics first
    (the release itself takes raw latents), one pass, clamped."""
    z = latents.shape[1]
    raw = latents * module.latents_std.view(1, z, 1, 1, 1) + module.latents_mean.view(1, z, 1, 1, 1)
    return module.decoder(raw).clamp(-1, 1)
