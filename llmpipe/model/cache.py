"""A preallocated key/value cache for incremental decoding.

One buffer per layer for keys and one for values, (n_layer, B, Hkv, max_len, D), written in place.
Every forward call appends its T new tokens at the same slots [end, end + T) of every row; which
slots hold a real token is kept per row in `valid` (B, max_len), so

    - a left-padded batch writes its pad tokens too, marked invalid: no query ever attends to them;
    - rows may hold different numbers of tokens (`lengths`, also each row's next rotary position);
    - `truncate` drops a row's newest tokens (a speculative decoder rolling back rejected drafts)
      by clearing their slots; a gap that leaves in the middle of a row is masked like a pad.

Rotary positions are applied before a key is written, so a slot's position is fixed when it is
written and gaps need no renumbering.
"""

from __future__ import annotations

import torch

from llmpipe.errors import UserError


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # slot holds a real token
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens per row
        self.end = 0  # slots written so far (the same for every row)
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def append(self, batch: int, new: int, attention_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Reserve slots for `new` tokens per row; returns (positions (B, T), attend mask (B, 1, T, S), first slot).

        `attention_mask` (B, T) is True for real tokens and False for padding (None: all real). A real
        token's rotary position is the number of real tokens before it in its row. The attend mask lets
        query t see the valid slots up to its own, plus always its own slot, so a pad query (whose
        output is ignored) still has one key and stays finite instead of a softmax over nothing.
        """
        if batch != self.batch:
            raise UserError(f"KV cache was made for batch {self.batch}, got a batch of {batch}")
        if self.end + new > self.max_len:
            raise UserError(f"KV cache holds {self.max_len} tokens; {self.end} used, {new} more do not fit: "
                            f"make it longer (max_len, at most the model's max_seq_len) or start a new one")
        device = self.valid.device
        real = (torch.ones(batch, new, dtype=torch.bool, device=device) if attention_mask is None
                else attention_mask.to(device=device, dtype=torch.bool))
        positions = self.lengths[:, None] + real.long().cumsum(dim=1) - 1  # (B, T)
        positions = positions.clamp(min=0)  # a leading pad gets -1: any position will do, it is never read
        start, self.end = self.end, self.end + new
        self.valid[:, start:self.end] = real
        self.lengths += real.sum(dim=1)
        slots = torch.arange(self.end, device=device)  # (S,)
        query_slots = torch.arange(start, self.end, device=device)[:, None]  # (T, 1)
        causal = slots[None, :] <= query_slots  # (T, S)
        own = slots[None, :] == query_slots
        attend = (self.valid[:, None, :self.end] & causal) | own  # (B, T, S)
        return positions, attend[:, None], start

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, Hkv, T, D) at slots [start, start + T) of `layer`; returns all written slots
        (B, Hkv, end, D) in k's dtype (the cache may be kept wider than an autocast forward)."""
        stop = start + k.shape[2]
        self.k[layer, :, :, start:stop] = k
        self.v[layer, :, :, start:stop] = v
        return self.k[layer, :, :, :self.end].to(k.dtype), self.v[layer, :, :, :self.end].to(v.dtype)

    def truncate(self, lengths: int | torch.Tensor) -> None:
        """Keep only each row's first `lengths` real tokens (an int for every row, or (B,) per row)."""
        keep = torch.as_tensor(lengths, dtype=torch.long, device=self.valid.device).expand(self.batch)
        if bool((keep < 0).any()):
            raise UserError(f"cannot truncate a KV cache to a negative length: {keep.tolist()}")
        self.valid &= self.valid.long().cumsum(dim=1) <= keep[:, None]
        self.lengths = torch.minimum(self.lengths, keep)
        used = self.valid.any(dim=0).nonzero()
        # slots past the last real token of every row are free again; earlier gaps stay masked
        self.end = int(used[-1]) + 1 if len(used) else 0

    def reset(self) -> None:
        self.truncate(0)
