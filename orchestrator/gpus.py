"""Canonical GPU names with their memory, and every provider's spelling mapped onto them.

Users write `gpu = ["H100"]`; RunPod says "NVIDIA H100 80GB HBM3", AWS says a p5 carries "H100",
Vast says "H100 SXM", Lambda says "gpu_1x_h100_sxm5". Placement compares canonical names only,
so this table is the one place where a provider's vocabulary is translated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str  # canonical
    vram_gb: int
    aliases: tuple[str, ...] = ()


GPUS: tuple[Gpu, ...] = (
    Gpu("H100-SXM", 80, ("H100", "H100 SXM", "H100 SXM5", "H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "h100_sxm5")),
    Gpu("H100-PCIE", 80, ("H100 PCIe", "NVIDIA H100 PCIe", "H100 80GB PCIe", "h100_pcie")),
    Gpu("H200", 141, ("NVIDIA H200", "H200 SXM")),
    Gpu("A100-80GB-SXM", 80, ("A100-80GB", "A100 SXM4 80GB", "NVIDIA A100-SXM4-80GB", "A100 80GB SXM", "a100_80gb_sxm4")),
    Gpu("A100-80GB-PCIE", 80, ("A100 80GB PCIe", "NVIDIA A100 80GB PCIe", "A100 PCIE", "a100_80gb_pcie")),
    Gpu("A100-40GB", 40, ("A100", "A100 SXM4 40GB", "NVIDIA A100-SXM4-40GB", "a100")),
    Gpu("L40S", 48, ("NVIDIA L40S",)),
    Gpu("L4", 24, ("NVIDIA L4",)),
    Gpu("A10G", 24, ("NVIDIA A10G",)),
    Gpu("A10", 24, ("NVIDIA A10", "a10")),
    Gpu("RTX-A6000", 48, ("RTX A6000", "NVIDIA RTX A6000", "A6000", "rtx_a6000")),
    Gpu("RTX-4090", 24, ("RTX 4090", "NVIDIA GeForce RTX 4090", "GeForce RTX 4090", "4090")),
    Gpu("RTX-3090", 24, ("RTX 3090", "NVIDIA GeForce RTX 3090", "3090")),
    Gpu("T4", 16, ("Tesla T4", "NVIDIA T4")),
    Gpu("V100", 16, ("Tesla V100", "V100-SXM2-16GB", "NVIDIA V100")),
)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY: dict[str, Gpu] = {}
for _gpu in GPUS:
    for _n in (_gpu.name, *_gpu.aliases):
        _BY_KEY.setdefault(_key(_n), _gpu)


def canonical_gpu(name: str) -> Gpu | None:
    """The canonical GPU for any known spelling, or None."""
    if not isinstance(name, str) or len(name) > 128:
        return None
    return _BY_KEY.get(_key(name))


def gpu_by_name(name: str) -> Gpu:
    gpu = canonical_gpu(name)
    if gpu is None:
        raise KeyError(name)
    return gpu
