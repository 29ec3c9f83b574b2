"""Configuration errors: each names the field it is about, by its path in the config.

A path is written the way the config is: field names joined with ".", list indices in
brackets and map keys quoted in brackets, and it continues through a ``typed_config`` into the
message packed there, for example
``static_resources.listeners[0].filter_chains[1].filters[0].typed_config.route_config
.virtual_hosts[0].routes[2].route.retry_policy``. The empty path means the config as a whole.

The translator never stops at the first problem: it collects every error of a config and raises
one ``ConfigErrors`` that lists them all. ``ConfigErrors`` is itself a ``ConfigError``, so
callers that only want to know "was the config bad" can catch ``ConfigError``.
"""

from __future__ import annotations

from collections.abc import Iterable

COMPAT_DOC = "docs/envoy-compat.md"


class ConfigError(Exception):
    """One problem with a configuration: ``path`` is where (see the module docstring) and
    ``message`` is what. ``unsupported`` is true for valid Envoy configuration that ubimesh does not
    implement; such errors say so and what to do about it."""

    def __init__(self, path: str, message: str, *, unsupported: bool = False) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message
        self.unsupported = unsupported

    @classmethod
    def not_supported(cls, path: str, detail: str = "") -> ConfigError:
        """An error for a field (or a value) that Envoy accepts and ubimesh does not implement."""
        message = "not supported by ubimesh"
        if detail:
            message += f" ({detail})"
        message += f"; remove it, or see {COMPAT_DOC} for the supported subset"
        return cls(path, message, unsupported=True)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {self.message!r})"


class ConfigErrors(ConfigError):
    """Every error found in one configuration (at least one). ``source`` names the config (a file
    name, or a resource name over xDS) when it is known; ``str()`` leaves it out, since callers
    usually say which file they loaded. ``path`` and ``message`` are those of the first error, so
    this can be handled like a single ``ConfigError``; ``str()`` lists them all, one a line."""

    def __init__(self, errors: Iterable[ConfigError], *, source: str = "") -> None:
        self.errors: tuple[ConfigError, ...] = tuple(errors)
        if not self.errors:
            raise ValueError("ConfigErrors needs at least one error")
        first = self.errors[0]
        super().__init__(first.path, first.message, unsupported=first.unsupported)
        self.source = source

    def __str__(self) -> str:
        count = len(self.errors)
        head = f"{count} configuration error{'s' if count != 1 else ''}"
        return head + ":\n" + "\n".join(f"  {error}" for error in self.errors)

    def __repr__(self) -> str:
        return f"ConfigErrors({list(self.errors)!r}, source={self.source!r})"

    def __reduce__(
        self,
    ) -> tuple[type[ConfigErrors], tuple[tuple[ConfigError, ...]], dict[str, str]]:
        return (type(self), (self.errors,), {"source": self.source})
