"""How blocks declare their channel coupling, so pruning finds channel groups in one generic pass.

Every decoder block implements ``channel_flow(flow, path, stage, stream) -> stream``: given the
channel group its input belongs to (``stream``), it tells ``flow`` which of its layers read that
group (consumers, with the norm in front of them), which write it (producers), which new groups it
starts (a width-changing shortcut, an upsample conv, a residual block's hidden width), and how
parameter-free index mappings tie groups together (``couple``: Wan2.2's DupUp shortcut). It
returns the group of its output. ``flashvaed.prune.groups`` implements ``ChannelFlow``; the
models only declare, in the vocabulary below.

The layers a block names declare the rest themselves:

- a *consumer* reads its input channels on dim 1 (convs), on the last dim (``nn.Linear``,
  applied to channel-last tensors), or where its class attribute ``input_channel_dim`` says;
  its ``weight`` is (out, in, ...), so input columns are ``weight[:, c]``;
- a *producer* writes its output channels as rows of ``weight`` (and ``bias``), in the blocks
  its role says (``ROWS``, ``TIME_ROWS``, ``D2S_ROWS``, ``V_ROWS``); how many rows a channel has
  is read from the weight's shape, never assumed;
- a *norm* named in ``consume`` is a ``PrunableNorm``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

# roles of a producer: which rows of its weight belong to the group (C channels, R rows of weight)
ROWS = "rows"  # output channels: row c carries channel c (R = C)
TIME_ROWS = "time_rows"  # time_conv of factor f = R // C: rows c, C + c, ..., (f-1)C + c carry channel c
V_ROWS = "v_rows"  # to_qkv: the last C rows (the v block)
D2S_ROWS = "d2s_rows"  # before depth-to-space by r = R // C (8 for 2x2x2, 12 for 3x2x2): rows rc .. rc+r-1

Group = Any  # a channel group, opaque to the models


@runtime_checkable
class PrunableNorm(Protocol):
    """A norm over a channel group, as pruning reads it (no parameter names are guessed).

    ``channel_params``: its per-channel parameters, indexed by channel on dim 0; the first is the
    gain (``("gamma",)`` for an RMS norm, ``("weight", "bias")`` for a group or layer norm). Pruning
    keeps their entries at the kept channels and multiplies the gain by ``pruned_scale(kept,
    total)``: what keeping ``kept`` of ``total`` channels does to the norm's output scale (an RMS
    norm: ``sqrt(total / kept)``; a group norm, whose statistics stay per group: 1.0).

    Optional class attributes, read with these defaults:

    - ``kept_norm_share: bool = False``: the norm divides by a statistic over all its channels (an
      RMS norm), so pruning (independence criterion) also multiplies the gain by the measured mean
      share ``||x_kept|| / ||x||`` of its input the kept channels carry;
    - ``student_params: tuple[str, ...] = ()``: parameters of ``channel_params`` a student's norm
      has where its teacher's may not (LTX's parameter-free pixel norm gains a ``gamma``); a teacher
      without one stands for the identity, so pruning starts it at 1 (the gain) or 0 (others);
    - ``input_channel_dim: int = 1``: the dim of its input that holds the channels.

    ``torch.nn.GroupNorm`` and ``torch.nn.LayerNorm`` (over the last dim) are read as declaring
    ``("weight", "bias")`` with scale 1.0.
    """

    channel_params: ClassVar[tuple[str, ...]]

    def pruned_scale(self, kept: int, total: int) -> float: ...


class ChannelFlow(Protocol):
    def start(self, kind: str, size: int, producer: str, role: str = ROWS, name: str = "") -> Group:
        """A new group of ``size`` channels written by ``producer`` (kind: stream, hidden, attention_v)."""
        ...

    def produce(self, group: Group, producer: str, role: str = ROWS) -> None:
        """``producer`` also writes ``group`` (a residual add into the same stream)."""
        ...

    def consume(self, group: Group, consumer: str, stage: str, norm: str | None = None) -> None:
        """``consumer`` is a linear layer whose input channels are ``group`` (after ``norm``, if any)."""
        ...

    def slice(self, group: Group, key: str, start: int = 0) -> None:
        """Entries ``start + c`` of parameter ``key`` (flattened) belong to channel ``c`` of ``group``:
        a per-channel gain, noise scale or scale-shift table row, pruned with the group."""
        ...

    def gather(self, group: Group, key: str, start: int = 0) -> None:
        """Buffer ``key`` lists, for the pruned layer, the entries ``start + c`` (kept c) it reads of
        an unpruned tensor (LTX's shared timestep embedding), in the order of ``start``."""
        ...

    def couple(self, source: Group, target: Group, path: str, sources: Callable[[int], list[int]]) -> Group:
        """Parameter-free layer ``path`` fills target channel ``o`` from source channels ``sources(o)``
        (in the order it reads them); returns the group of its output."""
        ...
