"""The one exception type users see for bad input, and the one-line warning."""

import sys


class ConfigError(ValueError):
    """Bad input: the message is one line naming the field and what is allowed."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def require(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError(field, message) unless condition holds."""
    if not condition:
        raise ConfigError(field, message)


def warn(message: str) -> None:
    """One ``warning:`` line on stderr (input accepted, but changed or suspicious)."""
    print(f"warning: {message}", file=sys.stderr)
