"""Dictionary latent ids <-> rows of a sampler state, both ways (one LatentMap).

Without `sample.latents` row i holds latent i. With a subset, rows 0..n-1 hold its ids in
ascending order and one more row, the sink, takes every other latent's codes with value 0:
a batch keeps its [B, T, k] shape, and nothing outside the subset reaches a statistic.
Sketch hashes use global ids (the sink's is SINK), so a latent's sketches are the same
whether it was sampled alone, in a subset or with every latent.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from explainer.sample.state import M31, SampleState

SINK = M31 - 1  # the global id of the sink row


class LatentMap:
    """Which dictionary latent each state row holds. `ids`: the kept dictionary ids, sorted
    (None: all `n_rows` latents, row i = latent i)."""

    def __init__(self, n_rows: int, ids: Optional[Sequence[int]] = None) -> None:
        self.ids = None if ids is None else [int(i) for i in ids]
        self.n_rows = n_rows
        self._tables: dict[torch.device, Tensor] = {}

    @classmethod
    def keep(cls, subset: Optional[Tensor], d_sae: int) -> LatentMap:
        """The map of a run keeping `subset` (sorted dictionary ids; None: all) of d_sae latents."""
        return cls(d_sae) if subset is None else cls(len(subset) + 1, subset.tolist())

    @classmethod
    def of_state(cls, state: SampleState) -> LatentMap:
        return cls(state.d_sae, state.meta.get("latents"))

    def meta(self) -> dict[str, Any]:
        """What a state's meta records of the map (nothing without a subset: older states match)."""
        return {} if self.ids is None else {"latents": list(self.ids)}

    @property
    def n_latents(self) -> int:
        """Rows holding a dictionary latent (all but the sink)."""
        return self.n_rows if self.ids is None else len(self.ids)

    def to_rows(self, vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """A batch's codes (values, dictionary ids) as (values, state rows); the sink's values are 0."""
        idx = idx.long()
        if self.ids is None:
            return vals, idx
        table = self._table(idx.device)
        rows = table[idx.clamp(max=len(table) - 1)]
        return vals.masked_fill(rows == self.n_latents, 0), rows

    def _table(self, device: torch.device) -> Tensor:
        # Dictionary id -> row up to the largest kept id; one more entry for every id above it (the sink).
        if device not in self._tables:
            assert self.ids is not None
            ids = torch.tensor(self.ids, dtype=torch.long, device=device)
            top = int(ids[-1]) if len(ids) else -1  # none kept (a latent slice outside --latents): all to the sink
            table = torch.full((top + 2,), self.n_latents, dtype=torch.long, device=device)
            table[ids] = torch.arange(len(ids), device=device)
            self._tables[device] = table
        return self._tables[device]

    def hash_ids(self, device: torch.device | str = "cpu") -> Tensor:
        """The global id of each row, which sketch hashes use."""
        if self.ids is None:
            return torch.arange(self.n_rows, device=device)
        return torch.tensor(self.ids + [SINK], dtype=torch.int64, device=device)

    def latents(self) -> np.ndarray:
        """The dictionary id of each row but the sink (int32)."""
        return np.arange(self.n_rows, dtype=np.int32) if self.ids is None else np.asarray(self.ids, dtype=np.int32)

    def to_dictionary(self, rows: dict[str, Any]) -> dict[str, Any]:
        """Example rows keyed by state row -> keyed by dictionary id; the sink's rows are dropped."""
        if self.ids is None:
            return rows
        keep = rows["latent"] < self.n_latents
        out = {k: (v[keep] if isinstance(v, Tensor) else v) for k, v in rows.items()}
        out["latent"] = torch.tensor(self.ids, dtype=torch.int32)[out["latent"].long()]
        return out
