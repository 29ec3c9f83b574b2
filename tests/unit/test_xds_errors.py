"""ConfigError and ConfigErrors: what callers (the CLI, the ADS client) get to show."""

from __future__ import annotations

import pickle

import pytest

from ubimesh.proxy.xds import ConfigError, ConfigErrors


def test_str_is_path_colon_message() -> None:
    error = ConfigError("static_resources.clusters[0].name", "must not be empty")
    assert str(error) == "static_resources.clusters[0].name: must not be empty"
    assert (error.path, error.message, error.unsupported) == (
        "static_resources.clusters[0].name", "must not be empty", False,
    )


def test_str_without_path_is_the_message() -> None:
    assert str(ConfigError("", "the config is empty")) == "the config is empty"


def test_not_supported_says_what_to_do() -> None:
    error = ConfigError.not_supported("a.retry_policy", "retries are not implemented yet")
    assert error.unsupported
    assert str(error) == (
        "a.retry_policy: not supported by ubimesh (retries are not implemented yet); remove it, "
        "or see docs/envoy-compat.md for the supported subset"
    )
    assert ConfigError.not_supported("b").message == (
        "not supported by ubimesh; remove it, or see docs/envoy-compat.md for the supported subset"
    )


def test_config_errors_lists_all_and_acts_like_the_first() -> None:
    first = ConfigError("a", "one")
    second = ConfigError.not_supported("b")
    errors = ConfigErrors([first, second], source="mesh.yaml")
    assert isinstance(errors, ConfigError)
    assert errors.errors == (first, second)
    assert (errors.path, errors.message, errors.source) == ("a", "one", "mesh.yaml")
    assert str(errors) == (
        "2 configuration errors:\n  a: one\n  b: " + second.message
    )
    assert str(ConfigErrors([first])) == "1 configuration error:\n  a: one"


def test_config_errors_needs_an_error() -> None:
    with pytest.raises(ValueError):
        ConfigErrors([])


def test_errors_survive_pickling() -> None:
    errors = ConfigErrors([ConfigError("a", "one"), ConfigError.not_supported("b")], source="f")
    copy = pickle.loads(pickle.dumps(errors))
    assert str(copy) == str(errors)
    assert copy.source == "f"
    assert copy.errors[1].unsupported is True
