"""Which slice of an image list a shard holds (``sct index --shard I/N``, ``sct embed``); plain data only.

Writing, reading and merging shard folders is ``retrieval.shards``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from core.errors import UserValueError


@dataclass(frozen=True)
class ShardSpec:
    """Slice ``index`` of ``count`` contiguous slices of an image list."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str, environ: Mapping[str, str] = os.environ) -> ShardSpec:
        """``"I/N"`` (0 ≤ I < N), or ``"env"``: I and N from RANK and WORLD_SIZE, as torchrun sets them."""
        if text == "env":
            missing = [name for name in ("RANK", "WORLD_SIZE") if name not in environ]
            if missing:
                verb = "is" if len(missing) == 1 else "are"
                raise UserValueError(
                    f"--shard env reads RANK and WORLD_SIZE (set by torchrun), but "
                    f"{' and '.join(missing)} {verb} not set"
                )
            text = f"{environ['RANK']}/{environ['WORLD_SIZE']}"
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not match or not int(match[1]) < int(match[2]):
            raise UserValueError(f"a shard is I/N with 0 <= I < N (or 'env'), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def bounds(self, total: int) -> tuple[int, int]:
        """[start, stop) of this slice of ``total`` images: slice sizes differ by at most one."""
        return self.index * total // self.count, (self.index + 1) * total // self.count

    @property
    def folder_name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
