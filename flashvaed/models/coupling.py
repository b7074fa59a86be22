"""How blocks declare their channel coupling, so pruning finds channel groups in one generic pass.

Every decoder block implements ``channel_flow(flow, path, stage, stream) -> stream``: given the
channel group its input belongs to (``stream``), it tells ``flow`` which of its layers read that
group (consumers, with the norm in front of them), which write it (producers), which new groups it
starts (a width-changing shortcut, an upsample conv, a residual block's hidden width), and how
parameter-free index mappings tie groups together (``couple``: Wan2.2's DupUp shortcut). It
returns the group of its output. ``flashvaed.prune.groups`` implements ``ChannelFlow``; the
models only declare, in the vocabulary below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

# roles of a producer: which rows of its weight belong to the group
ROWS = "rows"  # output channels
TIME_ROWS = "time_rows"  # time_conv: rows c and C + c both carry channel c (two output frames)
V_ROWS = "v_rows"  # to_qkv: the v block of rows
D2S_ROWS = "d2s_rows"  # a conv before depth-to-space: rows 8c .. 8c+7 carry channel c

Group = Any  # a channel group, opaque to the models


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
