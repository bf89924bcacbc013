"""`python -m calibration <command> ...`: one module per command.

Commands: list, fit, validate, agreement, accuracy. Each lives in ``calibration/cmd_<name>.py``
with a ``main(argv: list[str]) -> int`` function.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "list": "calibration.cmd_list",
    "fit": "calibration.cmd_fit",
    "validate": "calibration.cmd_validate",
    "agreement": "calibration.cmd_agreement",
    "accuracy": "calibration.cmd_accuracy",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m calibration {" + ",".join(COMMANDS) + "} [args]")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: command: unknown {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as err:
        if err.name == COMMANDS[name]:
            print(f"error: command: {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    from simulator.records.errors import ConfigError

    try:
        return int(module.main(rest) or 0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not type(err).__module__.startswith(("hydra.", "omegaconf.")):
            raise
        # a configuration error a command did not name itself: still one line
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        print(f"error: configuration: {first}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
