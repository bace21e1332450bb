"""The text side of a hub guidance model: prompt embeddings computed once per text, and which
big module sits on the GPU.

`EmbeddingCache` keeps the embedding of every text it encoded (the most recent `capacity`
texts), so the refine stage, a resumed run or the next run of the same prompt reuse the coarse
stage's embeddings; the text encoder is never dropped, so a cached model serves any later prompt.

`Placement` moves named modules to the compute device on use. Exclusive placement keeps one
of them there at a time and parks the others on the CPU: DeepFloyd IF's T5-XXL (about 9.5 GB
in fp16) and its IF-I-XL UNet (about 8.6 GB) never share the GPU. The T5 visits the GPU once
per new prompt, for a second or two of transfers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

from guidance.hub import free_memory


class EmbeddingCache:
    """texts -> [N, ...] embeddings, encoding only the texts it has not seen (in one call)."""

    def __init__(self, encode: Callable[[list[str]], Tensor], capacity: int = 256):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.encode, self.capacity = encode, capacity
        self.entries: OrderedDict[str, Tensor] = OrderedDict()
        self.encoded_texts = 0  # texts that went through the encoder (for tests and benchmarks)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> Tensor:
        texts = list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self.entries))
        if missing:
            embeddings = self.encode(missing).detach()
            self.encoded_texts += len(missing)
            for text, embedding in zip(missing, embeddings):
                self.entries[text] = embedding
        rows = []
        for text in texts:
            self.entries.move_to_end(text)
            rows.append(self.entries[text])
        while len(self.entries) > max(self.capacity, len(texts)):
            self.entries.popitem(last=False)
        return torch.stack(rows)


class Placement:
    """Named frozen modules, moved to `device` when used; `exclusive`: one at a time there."""

    def __init__(self, device: torch.device, modules: dict[str, torch.nn.Module], exclusive: bool,
                 park: torch.device | str = "cpu"):
        self.device, self.modules, self.exclusive = torch.device(device), modules, exclusive
        self.park = torch.device(park)
        # Names of the modules on `device` now: those built there count; exclusive keeps the last.
        built_there = [name for name, module in modules.items() if self._on_device(module)]
        self.resident: set[str] = set(built_there)
        if exclusive:
            for name in built_there[:-1]:
                self.modules[name].to(self.park)
                self.resident.discard(name)
        else:
            for name in modules:
                self.use(name)

    def _on_device(self, module: torch.nn.Module) -> bool:
        param = next(module.parameters(), None)
        if param is None or param.device.type != self.device.type:
            return False
        return self.device.index is None or param.device.index == self.device.index

    def use(self, name: str) -> torch.nn.Module:
        """The module, on `device` (parking the others first when exclusive)."""
        if name not in self.resident:
            if self.exclusive:
                for other in list(self.resident):
                    self.modules[other].to(self.park)
                    self.resident.discard(other)
                free_memory(self.device)
            self.modules[name].to(self.device)
            self.resident.add(name)
        return self.modules[name]
