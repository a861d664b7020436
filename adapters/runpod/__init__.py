"""The RunPod provider (the runpod SDK's GraphQL over native async HTTP): see adapter.py."""

from adapters.runpod.adapter import RunPodAdapter
from adapters.runpod.settings import RunPodSettings

__all__ = ["RunPodAdapter", "RunPodSettings"]
