"""The hippocampus queue (IFTCL): a FIFO ring buffer of the last K detached candidate embeddings.

Past candidates are reused as extra negative columns, so the negative set grows by K without an extra
forward pass and without gradient (the entries come from older model states, as in MoCo's queue). The
trainer enqueues the GATHERED candidates of every rank after backward, so every rank holds the same queue;
it is part of the checkpoint so that a resumed run continues exactly.

Storage is float32 whatever the training precision; the buffer is allocated at the first ``enqueue`` (when
D and the device are known) and follows the device of the incoming embeddings. Beside each entry the queue
keeps an int64 key (the hash of the entry's text, for duplicate-aware negatives; ``UNKNOWN_KEY`` when the
caller gave none), so a queued copy of an anchor's own positive can be left out like an in-batch one.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

UNKNOWN_KEY = -1
"""Key of entries enqueued without keys; text hashes never take this value (trainer.data.pairs.text_hash)."""


class HippocampusQueue:
    """FIFO of at most ``size`` embeddings; ``size=0`` is a disabled queue (every call is a no-op)."""

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"queue size must be an integer >= 0, got {size!r}")
        self.size = size
        self._buffer_KD: Optional[Tensor] = None
        self._keys_K: Optional[Tensor] = None
        self._ptr = 0  # next slot to write
        self._count = 0  # valid entries (<= size)

    def __len__(self) -> int:
        return self._count

    @property
    def enabled(self) -> bool:
        return self.size > 0

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, keys: Optional[Tensor] = None) -> None:
        """Append the rows of ``embeddings`` (B x D) and their ``keys`` (B,) (default ``UNKNOWN_KEY``), dropping
        the oldest entries beyond ``size``."""
        if not self.enabled:
            return
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"enqueue expects a non-empty 2-D (B, D) tensor, got "
                             f"{getattr(embeddings, 'shape', type(embeddings).__name__)}")
        if keys is not None and (not isinstance(keys, Tensor) or keys.shape != embeddings.shape[:1]):
            raise ValueError(f"enqueue keys must be a ({embeddings.shape[0]},) tensor, got "
                             f"{getattr(keys, 'shape', type(keys).__name__)}")
        x_BD = embeddings.detach().to(torch.float32)
        if self._buffer_KD is None:
            self._buffer_KD = torch.zeros(self.size, x_BD.shape[1], dtype=torch.float32, device=x_BD.device)
        elif self._buffer_KD.shape[1] != x_BD.shape[1]:
            raise ValueError(f"queue holds D={self._buffer_KD.shape[1]} embeddings, got D={x_BD.shape[1]}")
        if self._buffer_KD.device != x_BD.device:  # e.g. loaded from a checkpoint on CPU, training on GPU
            self._buffer_KD = self._buffer_KD.to(x_BD.device)
        if self._keys_K is None or self._keys_K.device != x_BD.device:
            self._keys_K = self._unknown_keys() if self._keys_K is None else self._keys_K.to(x_BD.device)
        k_B = torch.full(x_BD.shape[:1], UNKNOWN_KEY, device=x_BD.device) if keys is None else keys.to(
            device=x_BD.device, dtype=torch.long)
        if x_BD.shape[0] >= self.size:  # a batch larger than the queue: keep its newest rows
            self._buffer_KD.copy_(x_BD[-self.size:])
            self._keys_K.copy_(k_B[-self.size:])
            self._ptr, self._count = 0, self.size
            return
        num = x_BD.shape[0]
        first = min(num, self.size - self._ptr)  # rows before the wrap-around
        self._buffer_KD[self._ptr:self._ptr + first] = x_BD[:first]
        self._keys_K[self._ptr:self._ptr + first] = k_B[:first]
        if first < num:
            self._buffer_KD[:num - first] = x_BD[first:]
            self._keys_K[:num - first] = k_B[first:]
        self._ptr = (self._ptr + num) % self.size
        self._count = min(self.size, self._count + num)

    def _unknown_keys(self) -> Tensor:
        device = None if self._buffer_KD is None else self._buffer_KD.device
        return torch.full((self.size,), UNKNOWN_KEY, dtype=torch.long, device=device)

    def negatives(self) -> Optional[Tensor]:
        """The valid entries, oldest first (K' x D, float32, no grad); None when the queue is empty."""
        if self._count == 0 or self._buffer_KD is None:
            return None
        if self._count < self.size:
            return self._buffer_KD[:self._count]
        if self._ptr == 0:
            return self._buffer_KD
        return torch.cat([self._buffer_KD[self._ptr:], self._buffer_KD[:self._ptr]])

    def keys(self) -> Optional[Tensor]:
        """The keys of ``negatives()``, in the same order (K',) int64; None when the queue is empty."""
        if self._count == 0 or self._buffer_KD is None:
            return None
        keys_K = self._unknown_keys() if self._keys_K is None else self._keys_K
        if self._count < self.size:
            return keys_K[:self._count]
        return keys_K if self._ptr == 0 else torch.cat([keys_K[self._ptr:], keys_K[:self._ptr]])

    def state_dict(self) -> dict[str, Any]:
        """Buffer and keys (on CPU), pointer and count: everything needed to resume exactly."""
        buffer = None if self._buffer_KD is None else self._buffer_KD.detach().cpu().clone()
        keys = None if self._keys_K is None else self._keys_K.cpu().clone()
        return {"size": self.size, "buffer": buffer, "keys": keys, "ptr": self._ptr, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"size", "buffer", "ptr", "count"} <= set(state):
            raise ValueError("queue state must be a dict with keys size, buffer, ptr, count")
        if state["size"] != self.size:
            raise ValueError(f"checkpoint queue has size {state['size']} but loss.queue_size is {self.size}")
        buffer = state["buffer"]
        if buffer is not None and (buffer.dim() != 2 or buffer.shape[0] != self.size):
            raise ValueError(f"queue buffer must be ({self.size}, D), got {tuple(buffer.shape)}")
        ptr, count = int(state["ptr"]), int(state["count"])
        if not (0 <= count <= self.size and (self.size == 0 or 0 <= ptr < self.size)):
            raise ValueError(f"inconsistent queue state: ptr={ptr}, count={count}, size={self.size}")
        keys = state.get("keys")  # absent in checkpoints written before the queue kept keys
        if keys is not None and keys.shape != (self.size,):
            raise ValueError(f"queue keys must be ({self.size},), got {tuple(keys.shape)}")
        device = self._buffer_KD.device if self._buffer_KD is not None else None
        self._buffer_KD = None if buffer is None else buffer.detach().to(dtype=torch.float32, device=device).clone()
        self._keys_K = None if keys is None else keys.to(dtype=torch.long, device=device).clone()
        self._ptr, self._count = ptr, count
