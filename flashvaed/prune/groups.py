"""Channel groups: the sets of channels that must be pruned together, derived from the data flow.

A residual stream runs through blocks with identity shortcuts, attention, and temporal
upsamplers unchanged in its channel space: every block's output rows, every norm over it and
every layer reading it index the same channels, so they form one group. A 1x1 shortcut or an
upsample conv ends a stream and starts a new one. Inside each residual block the hidden width
(conv1's output, norm2, conv2's input) is its own group, and so is attention's v width.

Each group lists its *producers* (weights whose output rows are the group's channels), its
*consumers* (linear layers whose input columns are the group's channels: the places where
feature maps are collected and compensation is folded in) and the *norms* that normalise over
it. ``--explain`` prints exactly this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.blocks import AttentionBlock, ResidualBlock
from ..models.wan import WanDecoder

# roles of a producer: which rows of its weight belong to the group
ROWS = "rows"  # output channels
TIME_ROWS = "time_rows"  # time_conv: rows c and C + c both carry channel c (two output frames)
V_ROWS = "v_rows"  # to_qkv: the v block of rows


@dataclass
class ChannelGroup:
    name: str
    kind: str  # stream | input | hidden | attention_v
    size: int
    producers: list[tuple[str, str]] = field(default_factory=list)  # (module path, role)
    consumers: list[str] = field(default_factory=list)  # module paths whose inputs are the group
    norms: list[str] = field(default_factory=list)  # RMSNorm module paths over the group
    stages: list[str] = field(default_factory=list)  # decoder stages the group runs through

    def describe(self) -> str:
        producers = ", ".join(f"{p}{'' if r == ROWS else f' ({r})'}" for p, r in self.producers)
        return (
            f"{self.name} [{self.kind}, {self.size} channels]\n"
            f"  produced by: {producers}\n  consumed by: {', '.join(self.consumers)}\n"
            f"  normalised by: {', '.join(self.norms) or '-'}"
        )


def channel_groups(decoder: WanDecoder, prefix: str = "decoder") -> list[ChannelGroup]:
    """Every prunable channel group of a decoder, in data-flow order."""
    groups: list[ChannelGroup] = []

    def start(kind: str, size: int, producer: str, role: str = ROWS, name: str = "") -> ChannelGroup:
        group = ChannelGroup(name, kind, size, producers=[(producer, role)])
        groups.append(group)
        return group

    def consume(group: ChannelGroup, path: str, stage: str, norm: str | None = None) -> None:
        group.consumers.append(path)
        if norm:
            group.norms.append(norm)
        if stage not in group.stages:
            group.stages.append(stage)

    stream = start("stream", decoder.conv_in.out_channels, f"{prefix}.conv_in")
    for stage_name, _, stage in decoder.stages()[1:-1]:
        for j, block in enumerate(stage.blocks):
            path = f"{prefix}.{stage_name}.blocks.{j}"
            short = path.removeprefix(prefix + ".")
            if isinstance(block, AttentionBlock):
                consume(stream, f"{path}.to_qkv", stage_name, f"{path}.norm")
                stream.producers.append((f"{path}.proj", ROWS))
                v = start("attention_v", block.v_dim, f"{path}.to_qkv", V_ROWS, f"{short}.v")
                consume(v, f"{path}.proj", stage_name)
                continue
            assert isinstance(block, ResidualBlock)
            consume(stream, f"{path}.conv1", stage_name, f"{path}.norm1")
            hidden = start("hidden", block.norm2.gamma.shape[0], f"{path}.conv1", name=f"{short}.hidden")
            consume(hidden, f"{path}.conv2", stage_name, f"{path}.norm2")
            if block.shortcut is not None:  # the block maps one stream to another
                consume(stream, f"{path}.shortcut", stage_name)
                stream = start("stream", block.shortcut.out_channels, f"{path}.shortcut")
            stream.producers.append((f"{path}.conv2", ROWS))
        resample = stage.resample
        if resample is not None:
            path = f"{prefix}.{stage_name}.resample"
            if resample.time_conv is not None:
                consume(stream, f"{path}.time_conv", stage_name)
                stream.producers.append((f"{path}.time_conv", TIME_ROWS))
            consume(stream, f"{path}.conv", stage_name)
            stream = start("stream", resample.conv.out_channels, f"{path}.conv")
    consume(stream, f"{prefix}.head.conv", "head", f"{prefix}.head.norm")
    for g in groups:
        if g.kind != "stream":
            continue
        if len(g.consumers) == 2 and g.consumers[1].endswith(".shortcut"):
            g.kind, g.name = "input", f"{g.stages[0]}.input"  # feeds one width-changing block only
        else:
            g.name = "+".join(g.stages) + ".stream"
    return groups
