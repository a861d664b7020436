"""The local provider: run jobs on the machine the daemon itself runs on.

It exists so that a workstation or a single GPU server is one more place to run jobs, priced
(often at zero) and placed like any cloud. The machine is cut into slots: its GPUs (one job may
take several) and a few CPU-only slots. Jobs are isolated from the daemon's secrets and from each
other (a container, or a uid of their own; see isolation.py). The modules:

    settings.py   `[providers.local]`
    host.py       GPUs (nvidia-smi), processes (/proc), private files
    isolation.py  how jobs are kept apart: the choice, the uid registry, the container command
    adapter.py    the adapter itself
"""

from adapters.local.adapter import CPU_OFFER_ID, VANISHED_REASON, LocalAdapter, bill_of
from adapters.local.host import (
    MARKER_ENV,
    NO_GPUS,
    DetectedGpus,
    agent_alive,
    detect_gpus,
    group_members,
    parse_nvidia_smi,
)
from adapters.local.isolation import Choice, UidRegistry, choose, container_argv
from adapters.local.settings import LocalSettings

__all__ = [
    "CPU_OFFER_ID",
    "MARKER_ENV",
    "NO_GPUS",
    "VANISHED_REASON",
    "Choice",
    "DetectedGpus",
    "LocalAdapter",
    "LocalSettings",
    "UidRegistry",
    "agent_alive",
    "bill_of",
    "choose",
    "container_argv",
    "detect_gpus",
    "group_members",
    "parse_nvidia_smi",
]
