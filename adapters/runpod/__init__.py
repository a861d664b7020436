"""The RunPod provider (GraphQL through the `runpod` SDK): see adapter.py."""

from adapters.runpod.adapter import RunPodAdapter
from adapters.runpod.settings import RunPodSettings

__all__ = ["RunPodAdapter", "RunPodSettings"]
