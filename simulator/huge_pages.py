"""Fresh memory without transparent huge pages, for the simulator's command-line runs.

numpy asks the kernel for transparent huge pages on every array of 4 MiB or
more (``madvise(MADV_HUGEPAGE)``). Where the kernel cannot hand them out, as on
the VMs we run on (``AnonHugePages`` stays 0 kB in /proc/meminfo), each first
touch of such memory pays for a failed compaction attempt instead: there, 164 MB
of fresh arrays took 0.28 s with the advice and 0.07 s without. A run's
timeline columns (one row per engine step, a million steps and more) are
written once and read once, so huge pages would gain little even where they
can be had. Setting ``NUMPY_MADVISE_HUGEPAGE`` in the environment overrides
this either way (numpy reads it at import).
"""

from __future__ import annotations

import os


def avoid_huge_pages() -> bool:
    """Stop numpy's huge-page advice for this process, unless NUMPY_MADVISE_HUGEPAGE is set.

    Returns whether the advice is now off. Uses numpy's own switch (the one its
    import sets from the environment variable); without it, nothing changes.
    """
    import numpy as np

    if os.environ.get("NUMPY_MADVISE_HUGEPAGE") is not None:
        return os.environ["NUMPY_MADVISE_HUGEPAGE"] == "0"
    switch = getattr(getattr(getattr(np, "_core", None), "multiarray", None), "_set_madvise_hugepage", None)
    if switch is None:
        return False
    switch(False)
    return True
