"""Channel groups: the sets of channels that must be pruned together, found in one generic pass.

Every decoder block declares its channel coupling (``channel_flow``, vocabulary in
``flashvaed.models.coupling``); this module walks the decoder's stages in order and records what
they declare. A residual stream runs through blocks with identity shortcuts, attention, and
temporal upsamplers unchanged in its channel space: every block's output rows, every norm over it
and every layer reading it index the same channels, so they form one group. A 1x1 shortcut or an
upsample conv ends a stream and starts a new one — unless a parameter-free identity index map
adds it back to the stream it came from (Wan2.2's DupUp between equal widths), which ties both
into one group. Inside each residual block the hidden width (conv1's output, norm2, conv2's
input) is its own group, and so is attention's v width.

Each group lists its *producers* (weights whose output rows are the group's channels), its
*consumers* (linear layers whose input columns are the group's channels: the places where
feature maps are collected and compensation is folded in) and the *norms* that normalise over
it. A parameter-free map that reads several channels of one group per channel of another
(DupUp between different widths) is a ``ChannelLink``: the channels the target keeps decide
channels the source must keep. ``--explain`` prints all of this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..models.coupling import D2S_ROWS, ROWS, TIME_ROWS, V_ROWS

__all__ = [
    "D2S_ROWS",
    "ROWS",
    "TIME_ROWS",
    "V_ROWS",
    "ChannelGraph",
    "ChannelGroup",
    "ChannelLink",
    "channel_graph",
    "channel_groups",
]


@dataclass(eq=False)
class ChannelGroup:
    name: str
    kind: str  # stream | input | hidden | attention_v
    size: int
    producers: list[tuple[str, str]] = field(default_factory=list)  # (module path, role)
    consumers: list[str] = field(default_factory=list)  # module paths whose inputs are the group
    norms: list[str] = field(default_factory=list)  # norm module paths over the group (``PrunableNorm``)
    stages: list[str] = field(default_factory=list)  # decoder stages the group runs through
    slices: list[tuple[str, int]] = field(default_factory=list)  # (parameter key, start): per-channel entries
    gathers: list[tuple[str, int]] = field(default_factory=list)  # (index buffer key, start)

    def describe(self) -> str:
        producers = ", ".join(f"{p}{'' if r == ROWS else f' ({r})'}" for p, r in self.producers)
        return (
            f"{self.name} [{self.kind}, {self.size} channels]\n"
            f"  produced by: {producers}\n  consumed by: {', '.join(self.consumers)}\n"
            f"  normalised by: {', '.join(self.norms) or '-'}"
        )


@dataclass(eq=False)
class ChannelLink:
    """Parameter-free layer ``path``: target channel ``o`` is filled from source channels ``sources(o)``."""

    path: str
    source: ChannelGroup
    target: ChannelGroup
    sources: Callable[[int], list[int]]

    def required(self, kept_targets: list[int]) -> list[int]:
        """Source channels the kept target channels read (the source must keep them)."""
        return sorted({s for o in kept_targets for s in self.sources(o)})

    def gather(self, kept_targets: list[int], kept_sources: list[int]) -> list[int]:
        """For the pruned layer: positions among the kept sources of what each kept target reads."""
        position = {c: i for i, c in enumerate(kept_sources)}
        return [position[s] for o in kept_targets for s in self.sources(o)]


@dataclass
class ChannelGraph:
    groups: list[ChannelGroup]
    links: list[ChannelLink]
    stage_outputs: dict[str, ChannelGroup]  # the group of each stage's output (the head has none)


class _Flow:
    """Records what blocks declare (implements ``flashvaed.models.coupling.ChannelFlow``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.groups: list[ChannelGroup] = []
        self.links: list[ChannelLink] = []

    def start(self, kind: str, size: int, producer: str, role: str = ROWS, name: str = "") -> ChannelGroup:
        group = ChannelGroup(name.removeprefix(self.prefix + "."), kind, size, producers=[(producer, role)])
        self.groups.append(group)
        return group

    def produce(self, group: ChannelGroup, producer: str, role: str = ROWS) -> None:
        group.producers.append((producer, role))

    def consume(self, group: ChannelGroup, consumer: str, stage: str, norm: str | None = None) -> None:
        group.consumers.append(consumer)
        if norm:
            group.norms.append(norm)
        if stage not in group.stages:
            group.stages.append(stage)

    def slice(self, group: ChannelGroup, key: str, start: int = 0) -> None:
        group.slices.append((key, start))

    def gather(self, group: ChannelGroup, key: str, start: int = 0) -> None:
        group.gathers.append((key, start))

    def couple(
        self, source: ChannelGroup, target: ChannelGroup, path: str, sources: Callable[[int], list[int]]
    ) -> ChannelGroup:
        if source.size == target.size and all(sources(o) == [o] for o in range(target.size)):
            return self._merge(source, target)  # an identity map: one channel space
        self.links.append(ChannelLink(path, source, target, sources))
        return target

    def _merge(self, keep: ChannelGroup, gone: ChannelGroup) -> ChannelGroup:
        keep.producers += gone.producers
        keep.consumers += gone.consumers
        keep.norms += gone.norms
        keep.slices += gone.slices
        keep.gathers += gone.gathers
        keep.stages += [s for s in gone.stages if s not in keep.stages]
        self.groups.remove(gone)
        return keep


def channel_groups(decoder: nn.Module, prefix: str = "decoder") -> list[ChannelGroup]:
    """Every prunable channel group of a decoder, in data-flow order."""
    return channel_graph(decoder, prefix).groups


def channel_graph(decoder: nn.Module, prefix: str = "decoder") -> ChannelGraph:
    """The channel groups of a decoder, in data-flow order, the links between them and each
    stage's output group."""
    flow = _Flow(prefix)
    outputs: dict[str, ChannelGroup] = {}
    stream = None
    for name, _, block in decoder.stages():
        stream = block.channel_flow(flow, f"{prefix}.{name}", name, stream)
        if stream is not None:
            outputs[name] = stream
    for g in flow.groups:
        if g.kind != "stream":
            continue
        if len(g.consumers) == 2 and g.consumers[1].endswith(".shortcut"):
            g.kind, g.name = "input", f"{g.stages[0]}.input"  # feeds one width-changing block only
        else:
            g.name = "+".join(g.stages) + ".stream"
    return ChannelGraph(flow.groups, flow.links, outputs)
