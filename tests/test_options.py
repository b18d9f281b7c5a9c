"""``plugin_options``: defaults, per-plugin overrides key by key, sizes, and every bad value."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin_launcher.options import (
    OptionError,
    OptionTable,
    PluginOptions,
    parse_options,
    parse_size,
)

DEFAULTS = PluginOptions(restart="never", max_restarts=5, backoff_initial=1.0, backoff_max=60.0,
                         backoff_reset=60.0, stop_timeout=5.0, timeout=None, nice=None,
                         memory_max=None, open_files_max=None, cpu_time_max=None)


@pytest.mark.parametrize("raw", [None, {}])
def test_defaults(raw: Any) -> None:
    table = parse_options(raw)
    assert table.default == DEFAULTS
    assert table.for_plugin("anything.sh") == DEFAULTS
    assert DEFAULTS.has_limits is False


def test_default_section_applies_to_every_plugin() -> None:
    table = parse_options({"default": {"restart": "on-failure", "max_restarts": 0,
                                       "backoff": {"initial": 0.5, "max": 4, "reset": 10},
                                       "stop_timeout": 1, "timeout": 30, "nice": 10,
                                       "memory_max": "512M", "open_files_max": 1024,
                                       "cpu_time_max": 3600}})
    expected = PluginOptions(restart="on-failure", max_restarts=0, backoff_initial=0.5,
                             backoff_max=4.0, backoff_reset=10.0, stop_timeout=1.0, timeout=30.0,
                             nice=10, memory_max=512 << 20, open_files_max=1024,
                             cpu_time_max=3600)
    assert table.default == expected
    assert table.for_plugin("all_x.sh") == expected
    assert expected.has_limits is True


def test_plugin_entry_overrides_key_by_key() -> None:
    table = parse_options({
        "default": {"restart": "on-failure", "stop_timeout": 2, "backoff": {"initial": 0.5}},
        "all_heartbeat.py": {"restart": "always", "backoff": {"max": 10}},
        "sub/worker_0_x.sh": {"memory_max": "1G"},
    })
    heartbeat = table.for_plugin("all_heartbeat.py")
    assert heartbeat.restart == "always"
    assert heartbeat.stop_timeout == 2.0  # from default
    assert heartbeat.backoff_initial == 0.5  # from default
    assert heartbeat.backoff_max == 10.0  # its own
    assert heartbeat.backoff_reset == 60.0  # built-in
    nested = table.for_plugin("sub/worker_0_x.sh")
    assert nested.memory_max == 1 << 30
    assert nested.restart == "on-failure"
    other = table.for_plugin("all_other.sh")
    assert other == table.default
    assert other.restart == "on-failure" and other.memory_max is None


def test_entry_names_are_exact() -> None:
    table = parse_options({"all_x.sh": {"restart": "always"}})
    assert table.for_plugin("all_x.sh").restart == "always"
    assert table.for_plugin("ALL_X.SH").restart == "never"
    assert table.for_plugin("sub/all_x.sh").restart == "never"


def test_with_default_loses_to_a_plugins_own_entry() -> None:
    table = parse_options({"default": {"stop_timeout": 9},
                           "all_own.sh": {"stop_timeout": 3},
                           "all_other.sh": {"restart": "always"}})
    cli = table.with_default(stop_timeout=1.0)
    assert cli.default.stop_timeout == 1.0  # --stop-timeout beats the default section
    assert cli.for_plugin("all_own.sh").stop_timeout == 3.0  # the plugin's own entry wins
    assert cli.for_plugin("all_other.sh").stop_timeout == 1.0
    assert cli.for_plugin("all_other.sh").restart == "always"
    assert cli.for_plugin("unlisted.sh").stop_timeout == 1.0
    assert table.default.stop_timeout == 9.0  # the original is unchanged


@pytest.mark.parametrize(("value", "size"), [
    ("512M", 512 << 20), ("512m", 512 << 20), ("512MB", 512 << 20), ("512MiB", 512 << 20),
    ("1G", 1 << 30), ("1g", 1 << 30), ("1GiB", 1 << 30), ("1.5GiB", int(1.5 * (1 << 30))),
    ("1.5G", 1610612736), ("2T", 2 << 40), ("64K", 64 << 10), ("64KiB", 65536),
    ("100", 100), ("100B", 100), (" 8 M ", 8 << 20), ("0.5K", 512),
    (4096, 4096), (1, 1), (None, None),
])
def test_parse_size(value: Any, size: int | None) -> None:
    assert parse_size("memory_max", value) == size


@pytest.mark.parametrize(("value", "message"), [
    ("lots", "expected a size such as 512M or 2G, got 'lots'"),
    ("", "expected a size such as 512M or 2G, got ''"),
    ("-1M", "expected a size such as 512M or 2G, got '-1M'"),
    ("1X", "expected a size such as 512M or 2G, got '1X'"),
    ("1e6", "expected a size such as 512M or 2G, got '1e6'"),
    ("M", "expected a size such as 512M or 2G, got 'M'"),
    ("1 G B", "expected a size such as 512M or 2G, got '1 G B'"),
    (1.5, "expected a size such as 512M or 2G, got 1.5"),
    (True, "expected a size such as 512M or 2G, got True"),
    ([1], "expected a size such as 512M or 2G, got [1]"),
    (0, "must be positive, got 0"),
    (-5, "must be positive, got -5"),
    ("0", "must be positive, got '0'"),
    ("0M", "must be positive, got '0M'"),
    ("0.1", "must be positive, got '0.1'"),
])
def test_parse_size_errors_name_the_key(value: Any, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_size("plugin_options.default.memory_max", value)
    assert str(info.value) == f"plugin_options.default.memory_max: {message}"


BAD = [
    ({"restart": "sometimes"}, "restart",
     "expected one of never, on-failure, always, got 'sometimes'"),
    ({"restart": None}, "restart", "expected one of never, on-failure, always, got None"),
    ({"restart": True}, "restart", "expected one of never, on-failure, always, got True"),
    ({"restart": "Always"}, "restart", "expected one of never, on-failure, always, got 'Always'"),
    ({"max_restarts": -1}, "max_restarts", "must be >= 0, got -1"),
    ({"max_restarts": 1.5}, "max_restarts", "expected an integer, got 1.5"),
    ({"max_restarts": "3"}, "max_restarts", "expected an integer, got '3'"),
    ({"max_restarts": True}, "max_restarts", "expected an integer, got True"),
    ({"stop_timeout": -1}, "stop_timeout", "must be between 0 and 3600 seconds (1 hour), got -1"),
    ({"stop_timeout": "5"}, "stop_timeout", "expected a number, got '5'"),
    ({"stop_timeout": None}, "stop_timeout", "expected a number, got None"),
    ({"stop_timeout": float("inf")}, "stop_timeout",
     "must be between 0 and 3600 seconds (1 hour), got inf"),
    ({"stop_timeout": float("nan")}, "stop_timeout",
     "must be between 0 and 3600 seconds (1 hour), got nan"),
    ({"stop_timeout": False}, "stop_timeout", "expected a number, got False"),
    ({"timeout": 0}, "timeout", "must be positive or null, got 0"),
    ({"timeout": -3}, "timeout", "must be between 0 and 2592000 seconds (30 days), got -3"),
    ({"timeout": "1h"}, "timeout", "expected a number, got '1h'"),
    ({"nice": 20}, "nice", "must be between -20 and 19, got 20"),
    ({"nice": -21}, "nice", "must be between -20 and 19, got -21"),
    ({"nice": "10"}, "nice", "expected an integer, got '10'"),
    ({"memory_max": "lots"}, "memory_max", "expected a size such as 512M or 2G, got 'lots'"),
    ({"memory_max": 0}, "memory_max", "must be positive, got 0"),
    ({"open_files_max": 0}, "open_files_max", "must be >= 1, got 0"),
    ({"open_files_max": "many"}, "open_files_max", "expected an integer, got 'many'"),
    ({"cpu_time_max": 0}, "cpu_time_max", "must be between 1 and 315360000, got 0"),
    ({"cpu_time_max": 1.5}, "cpu_time_max", "expected an integer, got 1.5"),
    ({"backoff": 5}, "backoff", "expected a mapping of initial/max/reset, got 5"),
    ({"backoff": {"initial": -1}}, "backoff.initial",
     "must be between 0.05 and 2592000 seconds (30 days), got -1"),
    ({"backoff": {"max": "x"}}, "backoff.max", "expected a number, got 'x'"),
    ({"backoff": {"reset": None}}, "backoff.reset", "expected a number, got None"),
    ({"backoff": {"jitter": 1}}, "backoff.jitter", "unknown option (known: initial, max, reset)"),
    ({"backoff": {"initial": 10, "max": 5}}, "backoff.max", "must be >= backoff.initial"),
    ({"backoff": {"initial": 120}}, "backoff.max", "must be >= backoff.initial"),
]
KNOWN = ("backoff, cpu_time_max, log_backups, log_file, log_max_bytes, max_restarts, "
         "memory_max, nice, open_files_max, ready, ready_timeout, restart, scope, scope_key, "
         "stop_timeout, timeout, watchdog")
BAD += [
    ({"restrat": "always"}, "restrat", f"unknown option (known: {KNOWN})"),
    ({"backoff_initial": 1}, "backoff_initial", f"unknown option (known: {KNOWN})"),
    ({"Restart": "always"}, "Restart", f"unknown option (known: {KNOWN})"),
]


@pytest.mark.parametrize(("entry", "key", "message"), BAD)
@pytest.mark.parametrize("section", ["default", "all_x.sh", "sub/worker_0_y.py"])
def test_bad_values_name_the_key(section: str, entry: dict[str, Any], key: str,
                                 message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_options({section: entry})
    assert str(info.value) == f"plugin_options.{section}.{key}: {message}"


def test_plugin_entry_is_checked_on_top_of_the_default() -> None:
    # each is fine alone; together backoff.max < backoff.initial
    with pytest.raises(OptionError) as info:
        parse_options({"default": {"backoff": {"initial": 10}},
                       "all_x.sh": {"backoff": {"max": 5}}})
    assert str(info.value) == "plugin_options.all_x.sh.backoff.max: must be >= backoff.initial"


@pytest.mark.parametrize(("raw", "message"), [
    ([1], "plugin_options: expected a mapping, got list"),
    ("restart: always", "plugin_options: expected a mapping, got str"),
    ({"default": None}, "plugin_options.default: expected a mapping, got None"),
    ({"default": "always"}, "plugin_options.default: expected a mapping, got 'always'"),
    ({"all_x.sh": [1]}, "plugin_options.all_x.sh: expected a mapping, got [1]"),
])
def test_bad_sections(raw: Any, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_options(raw)
    assert str(info.value) == message


@pytest.mark.parametrize(("entry", "field", "value"), [
    ({"restart": "always"}, "restart", "always"),
    ({"restart": "on-failure"}, "restart", "on-failure"),
    ({"max_restarts": 0}, "max_restarts", 0),
    ({"stop_timeout": 0}, "stop_timeout", 0.0),
    ({"stop_timeout": 0.25}, "stop_timeout", 0.25),
    ({"timeout": None}, "timeout", None),
    ({"timeout": 0.5}, "timeout", 0.5),
    ({"nice": -20}, "nice", -20),
    ({"nice": 19}, "nice", 19),
    ({"nice": None}, "nice", None),
    ({"open_files_max": 1}, "open_files_max", 1),
    ({"cpu_time_max": 1}, "cpu_time_max", 1),
    ({"memory_max": 1}, "memory_max", 1),
    ({"backoff": {}}, "backoff_initial", 1.0),
    ({"backoff": {"initial": 0.05, "max": 0.05}}, "backoff_max", 0.05),
])
def test_boundary_values_are_accepted(entry: dict[str, Any], field: str, value: Any) -> None:
    assert getattr(parse_options({"default": entry}).default, field) == value


def test_option_table_default_constructor() -> None:
    assert OptionTable().for_plugin("x") == DEFAULTS


@pytest.mark.parametrize(("entry", "key"), [
    ({"stop_timeout": 10**400}, "stop_timeout"),
    ({"timeout": 10**400}, "timeout"),
    ({"backoff": {"initial": 10**400}}, "backoff.initial"),
    ({"memory_max": "1" + "0" * 400 + "G"}, "memory_max"),
    ({"memory_max": "9" * 400}, "memory_max"),
])
def test_huge_numbers_are_an_option_error(entry: dict[str, Any], key: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_options({"default": entry})
    assert str(info.value).startswith(f"plugin_options.default.{key}: ")


values = st.one_of(st.none(), st.booleans(), st.integers(-100, 10**9),
                   st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.text(max_size=8), st.sampled_from(["never", "on-failure", "always", "1G"]),
                   st.dictionaries(st.sampled_from(["initial", "max", "reset", "x"]),
                                   st.floats(-1, 100), max_size=3))
entries = st.dictionaries(
    st.sampled_from(["restart", "max_restarts", "backoff", "stop_timeout", "timeout", "nice",
                     "memory_max", "open_files_max", "cpu_time_max", "bogus"]),
    values, max_size=4)


@settings(deadline=None)  # no per-example deadline: slowness on a loaded machine is no bug
@given(st.dictionaries(st.sampled_from(["default", "all_x.sh", "w.py"]), entries, max_size=3))
def test_parse_options_only_raises_option_error(raw: dict[str, Any]) -> None:
    try:
        table = parse_options(raw)
    except OptionError as exc:
        assert str(exc).startswith("plugin_options")
    else:
        for name in raw:
            options = table.for_plugin(name)
            assert options.restart in ("never", "on-failure", "always")
            assert options.stop_timeout >= 0
            assert options.backoff_max >= options.backoff_initial
