"""Where a profile goes: a directory of the machine that measures it, never another machine's.

By default ``calibration/profiles/<hardware>-<machine key>/<model>/<optimization>/``, the key
being 8 hex digits of the machine fingerprint (profiler.hardware.machine_fingerprint). A
directory chosen with ``hardware_name=`` or ``output_dir=`` that already holds a profile (or
an unfinished run) of another machine is left alone: the run goes to a sibling directory
keyed by this machine's fingerprint, and one line says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiler.hardware import describe_machine, fingerprint_of_meta, machine_differences
from profiler.settings import PROFILES_DIR, ProfilerSettings
from profiler.store import PARTIAL, RUN_FILE
from simulator.records.errors import ConfigError
from simulator.records.profile import META_FILE


@dataclass(frozen=True)
class Location:
    """The directory a run writes, and the line that explains a move (empty when none)."""

    path: Path
    note: str = ""


def owner(folder: Path) -> tuple[str, dict[str, Any] | None] | None:
    """(what, machine fingerprint) of the profile or unfinished run in folder; None if empty.

    ``what`` is "profile" or "unfinished run"; the fingerprint is None when unreadable or
    not recorded (an unfinished run of an older profiler)."""
    meta_path = folder / META_FILE
    if meta_path.exists():
        try:
            return "profile", fingerprint_of_meta(json.loads(meta_path.read_text()))
        except (OSError, json.JSONDecodeError):
            return "profile", None
    run_path = folder / PARTIAL / RUN_FILE
    if run_path.exists():
        try:
            return "unfinished run", json.loads(run_path.read_text()).get("machine")
        except (OSError, json.JSONDecodeError, AttributeError):
            return "unfinished run", None
    return None


def keyed(folder: Path, key: str) -> Path:
    """folder with the machine key appended to its name: .../none -> .../none-1a2b3c4d."""
    return folder.with_name(f"{folder.name}-{key}")


def choose(target: Path, fingerprint: dict[str, Any], key: str, alternative: Path | None = None) -> Location:
    """target if it is empty or this machine's; else ``alternative`` (default: target keyed)."""
    found = owner(target)
    if found is None or found[1] == fingerprint:
        return Location(target)
    what, theirs = found
    moved = alternative or keyed(target, key)
    why = machine_differences(theirs, fingerprint) if theirs else "it records no machine fingerprint"
    note = (f"[profiler] not reusing the {what} in {target}: it was measured on another machine ({why}); "
            f"this machine ({describe_machine(fingerprint)}) writes {moved}")
    again = owner(moved)
    if again is not None and again[1] != fingerprint:
        raise ConfigError("output_dir", f"{target} and {moved} both hold profiles of other machines; "
                          "give another output_dir")
    return Location(moved, note)


def profile_location(settings: ProfilerSettings, slug: str, fingerprint: dict[str, Any], key: str) -> Location:
    """The directory of this run: output_dir, else calibration/profiles/<hardware>/<model>/<opt>
    with <hardware> = hardware_name, or <slug>-<key> when not given; moved if another machine's."""
    tail = Path(settings.resolved_model_name) / settings.optimization.name
    if settings.output_dir:
        return choose(Path(settings.output_dir), fingerprint, key)
    if settings.hardware_name:
        return choose(PROFILES_DIR / settings.hardware_name / tail, fingerprint, key,
                      PROFILES_DIR / f"{settings.hardware_name}-{key}" / tail)
    return choose(PROFILES_DIR / f"{slug}-{key}" / tail, fingerprint, key)


def writable_directory(folder: Path, field: str) -> Path:
    """folder, created; ConfigError naming ``field`` when this user cannot write there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".rllm-sim-write-test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(field, f"must be a directory this user can write, got {str(folder)!r} "
                          f"({err.strerror or err})") from None
    return folder
