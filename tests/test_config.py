"""Configuration: YAML files, environment variables, LMCache's config object, and every error."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin_launcher import ConfigError, LauncherConfig, load_config
from plugin_launcher.config import coerce_config, from_mapping


def write(tmp_path: Path, text: str, name: str = "lmcache.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------
# YAML files


def test_documentation_example_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'plugin_locations:\n  - "/path/to/plugins"\n\n'
                           "extra_config:\n  custom_setting: value\n")
    config = load_config(path, env={})
    assert config.plugin_locations == ["/path/to/plugins"]
    assert config.extra_config == {"custom_setting": "value"}
    assert config.source == path
    assert json.loads(config.to_json()) == {
        "plugin_locations": ["/path/to/plugins"],
        "extra_config": {"custom_setting": "value"},
    }


def test_unknown_keys_are_kept_in_data_and_json(tmp_path: Path) -> None:
    path = write(tmp_path, "chunk_size: 256\nlocal_cpu: true\nremote_url: 'lm://localhost:65432'\n"
                           "nested: {a: [1, 2, {b: null}]}\nplugin_locations: [/p]\n")
    config = load_config(path, env={})
    expected = {"chunk_size": 256, "local_cpu": True, "remote_url": "lm://localhost:65432",
                "nested": {"a": [1, 2, {"b": None}]}}
    for key, value in expected.items():
        assert config.data[key] == value
    as_json = json.loads(config.to_json())
    assert {k: as_json[k] for k in expected} == expected
    assert as_json["plugin_locations"] == ["/p"]
    assert as_json["extra_config"] == {}


def test_yaml_dates_and_odd_scalars_still_become_json(tmp_path: Path) -> None:
    path = write(tmp_path, "started: 2024-05-01\nratio: .5\n")
    as_json = json.loads(load_config(path, env={}).to_json())
    assert as_json["started"] == "2024-05-01"
    assert as_json["ratio"] == 0.5


@pytest.mark.parametrize(("text", "locations"), [
    ("plugin_locations: /srv/plugins\n", ["/srv/plugins"]),
    ("plugin_locations: [/a, /b]\n", ["/a", "/b"]),
    ("plugin_locations:\n  - /a\n  - rel/b\n", ["/a", "rel/b"]),
    ("plugin_locations: []\n", []),
    ("plugin_locations: null\n", []),
    ("other: 1\n", []),
])
def test_plugin_locations_forms(tmp_path: Path, text: str, locations: list[str]) -> None:
    config = load_config(write(tmp_path, text), env={})
    # made absolute against the cwd at load (a later chdir cannot break restarts)...
    assert config.plugin_locations == [os.path.abspath(x) for x in locations]
    # ...while plugins see the list as written
    assert json.loads(config.to_json())["plugin_locations"] == locations


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_is_an_empty_configuration(tmp_path: Path, text: str) -> None:
    config = load_config(write(tmp_path, text), env={})
    assert config.plugin_locations == []
    assert config.extra_config == {}
    assert config.allow_insecure_plugins is False
    assert config.watch_plugins is False


def test_flags_and_options_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, "allow_insecure_plugins: true\nwatch_plugins: yes\n"
                           "plugin_options:\n  default: {restart: on-failure, stop_timeout: 2}\n"
                           "  all_x.sh: {restart: always}\n")
    config = load_config(path, env={})
    assert config.allow_insecure_plugins is True
    assert config.watch_plugins is True
    assert config.options.default.restart == "on-failure"
    assert config.options.default.stop_timeout == 2.0
    assert config.options.for_plugin("all_x.sh").restart == "always"
    assert config.options.for_plugin("all_x.sh").stop_timeout == 2.0


def test_with_locations_appends_and_updates_json(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "plugin_locations: [/a]\nkeep: 1\n"), env={})
    more = config.with_locations(["/b", "/c"])
    assert more.plugin_locations == ["/a", "/b", "/c"]
    assert json.loads(more.to_json()) == {"plugin_locations": ["/a", "/b", "/c"],
                                          "extra_config": {}, "keep": 1}
    assert config.plugin_locations == ["/a"]  # the original is unchanged


# ---------------------------------------------------------------------------------------------
# environment variables and LMCACHE_CONFIG_FILE


@pytest.mark.parametrize(("value", "locations"), [
    ('["/a", "/b"]', ["/a", "/b"]),
    ('  ["/a"]  ', ["/a"]),
    ("/a,/b", ["/a", "/b"]),
    (" /a , /b ,, ", ["/a", "/b"]),
    ("/only", ["/only"]),
    ("", []),
    ("   ", []),
])
def test_locations_from_environment(value: str, locations: list[str]) -> None:
    config = load_config(env={"LMCACHE_PLUGIN_LOCATIONS": value})
    assert config.plugin_locations == locations
    assert config.extra_config == {}
    assert json.loads(config.to_json())["plugin_locations"] == locations


def test_extra_config_from_environment() -> None:
    config = load_config(env={"LMCACHE_PLUGIN_LOCATIONS": "/p",
                              "LMCACHE_EXTRA_CONFIG": '{"custom_setting": "value", "n": [1]}'})
    assert config.plugin_locations == ["/p"]
    assert config.extra_config == {"custom_setting": "value", "n": [1]}
    assert json.loads(config.to_json()) == {"plugin_locations": ["/p"],
                                            "extra_config": {"custom_setting": "value", "n": [1]}}


def test_no_file_and_no_variables_is_empty() -> None:
    config = load_config(env={})
    assert config.plugin_locations == []
    assert config.extra_config == {}


@pytest.mark.parametrize(("value", "kind"), [
    ("[1, 2]", "list"), ('"text"', "str"), ("3", "int"), ("null", "NoneType"), ("true", "bool"),
])
def test_extra_config_not_an_object_names_the_variable(value: str, kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"LMCACHE_EXTRA_CONFIG": value})
    assert str(info.value) == f"LMCACHE_EXTRA_CONFIG: expected a JSON object, got {kind}"


@pytest.mark.parametrize(("name", "value"), [
    ("LMCACHE_EXTRA_CONFIG", "{not json"),
    ("LMCACHE_EXTRA_CONFIG", "{'a': 1}"),
    ("LMCACHE_PLUGIN_LOCATIONS", '["/a", '),
])
def test_malformed_json_in_environment_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={name: value})
    assert str(info.value).startswith(f"{name}: malformed JSON")


@pytest.mark.parametrize("value", ["[1, 2]", '[""]', '[["/a"]]'])
def test_locations_variable_with_non_paths_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"LMCACHE_PLUGIN_LOCATIONS": value})
    assert "LMCACHE_PLUGIN_LOCATIONS" in str(info.value)


def test_environment_variables_win_over_the_file_key_by_key(tmp_path: Path) -> None:
    """LMCache's rule in 0.3 and 0.5 alike: from_file, then update_config_from_env."""
    path = write(tmp_path, "plugin_locations: [/from/file]\nextra_config: {k: v}\nother: 1\n")
    env = {"LMCACHE_PLUGIN_LOCATIONS": "/from/env", "LMCACHE_EXTRA_CONFIG": '{"env": 1}'}
    config = load_config(path, env=env)
    assert config.plugin_locations == ["/from/env"]
    assert config.extra_config == {"env": 1}
    assert json.loads(config.to_json())["other"] == 1
    assert load_config(path, env={"LMCACHE_EXTRA_CONFIG": '{"env": 1}'}).plugin_locations == [
        "/from/file"]


def test_runtime_plugin_locations_in_file_and_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "runtime_plugin_locations: [/new]\nplugin_locations: [/old, /new]\n")
    config = load_config(path, env={})
    assert config.plugin_locations == ["/new", "/old"]
    data = json.loads(config.to_json())
    assert data["runtime_plugin_locations"] == data["plugin_locations"] == ["/new", "/old"]
    config = load_config(path, env={"LMCACHE_RUNTIME_PLUGIN_LOCATIONS": '["/a", "/b"]'})
    assert config.plugin_locations == ["/a", "/b"]
    assert "plugin_locations" not in json.loads(config.to_json())
    config = load_config(env={"LMCACHE_RUNTIME_PLUGIN_LOCATIONS": "/a,/b",
                              "LMCACHE_PLUGIN_LOCATIONS": "/c"})
    assert config.plugin_locations == ["/a", "/b", "/c"]


def test_broken_environment_variable_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, "plugin_locations: [/from/file]\n")
    with pytest.raises(ConfigError, match="^LMCACHE_PLUGIN_LOCATIONS: expected a list"):
        load_config(path, env={"LMCACHE_PLUGIN_LOCATIONS": "[1]"})
    with pytest.raises(ConfigError, match="^LMCACHE_EXTRA_CONFIG: malformed JSON"):
        load_config(path, env={"LMCACHE_EXTRA_CONFIG": "[broken"})


def test_config_file_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "plugin_locations: [/from/file]\nextra_config: {k: v}\n")
    config = load_config(env={"LMCACHE_CONFIG_FILE": path})
    assert config.plugin_locations == ["/from/file"]
    assert config.extra_config == {"k": "v"}
    assert config.source == path


def test_explicit_path_wins_over_config_file_variable(tmp_path: Path) -> None:
    mine = write(tmp_path, "plugin_locations: [/mine]\n", "mine.yaml")
    other = write(tmp_path, "plugin_locations: [/other]\n", "other.yaml")
    assert load_config(mine, env={"LMCACHE_CONFIG_FILE": other}).plugin_locations == ["/mine"]


def test_empty_config_file_variable_means_environment() -> None:
    config = load_config(env={"LMCACHE_CONFIG_FILE": "", "LMCACHE_PLUGIN_LOCATIONS": "/env"})
    assert config.plugin_locations == ["/env"]


def test_config_file_variable_pointing_nowhere_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(env={"LMCACHE_CONFIG_FILE": missing})
    assert str(info.value).startswith(f"{missing}: cannot read configuration")


def test_default_env_is_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    monkeypatch.setenv("LMCACHE_PLUGIN_LOCATIONS", "/x,/y")
    monkeypatch.setenv("LMCACHE_EXTRA_CONFIG", '{"a": 1}')
    config = load_config()
    assert config.plugin_locations == ["/x", "/y"]
    assert config.extra_config == {"a": 1}


# ---------------------------------------------------------------------------------------------
# file errors: every message names the file, and the key where there is one


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: cannot read configuration: No such file or directory"


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), env={})
    assert str(info.value) == f"{tmp_path}: cannot read configuration: Is a directory"


@pytest.mark.parametrize(("text", "line"), [
    ("a: 1\nb: [1, 2\nc: 3\n", 3),
    ("a: 1\n\tb: 2\n", 2),
    ("a: b: c\n", 1),
    ("plugin_locations: [/a]\nkey: 'unterminated\n", 3),
    ("x: 1\ny: 2\nz: {a: 1\n", 4),
])
def test_malformed_yaml_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: malformed YAML (line {line}): ")


def test_undefined_alias_is_malformed_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "a: *nothing\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: malformed YAML")


def test_python_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "a: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: malformed YAML")


@pytest.mark.parametrize(("text", "kind"), [
    ("- /a\n- /b\n", "list"),
    ("just a string\n", "str"),
    ("42\n", "int"),
    ("true\n", "bool"),
])
def test_top_level_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: expected a mapping at the top level, got {kind}"


@pytest.mark.parametrize(("text", "message"), [
    ("plugin_locations: 5\n", "plugin_locations: expected a list of paths, got 5"),
    ("plugin_locations: [1]\n", "plugin_locations: expected a list of paths, got [1]"),
    ("plugin_locations: ['']\n", "plugin_locations: expected a list of paths, got ['']"),
    ("plugin_locations: [[/a]]\n", "plugin_locations: expected a list of paths, got [['/a']]"),
    ("plugin_locations: {a: 1}\n", "plugin_locations: expected a list of paths, got {'a': 1}"),
    ("plugin_locations: ''\n", "plugin_locations: expected a list of paths, got ''"),
    ("extra_config: [1]\n", "extra_config: expected a mapping, got list"),
    ("extra_config: text\n", "extra_config: expected a mapping, got str"),
    ("allow_insecure_plugins: 1\n", "allow_insecure_plugins: expected true or false, got 1"),
    ("allow_insecure_plugins: 'yes'\n",
     "allow_insecure_plugins: expected true or false, got 'yes'"),
    ("watch_plugins: null\n", "watch_plugins: expected true or false, got None"),
    ("plugin_options: [1]\n", "plugin_options: expected a mapping, got list"),
    ("plugin_options: {default: {restart: sometimes}}\n",
     "plugin_options.default.restart: expected one of never, on-failure, always, "
     "got 'sometimes'"),
    ("plugin_options: {all_x.sh: {max_restarts: -1}}\n",
     "plugin_options.all_x.sh.max_restarts: must be >= 0, got -1"),
    ("plugin_options: {default: {memory_max: lots}}\n",
     "plugin_options.default.memory_max: expected a size such as 512M or 2G, got 'lots'"),
])
def test_wrong_types_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize(("option", "value"), [
    ("stop_timeout", "1" + "0" * 400),
    ("backoff: {initial", "1" + "0" * 400 + "}"),
    ("memory_max", "1" + "0" * 400 + "G"),
])
def test_huge_numbers_are_a_config_error(tmp_path: Path, option: str, value: str) -> None:
    path = write(tmp_path, f"plugin_options:\n  default: {{{option}: {value}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: plugin_options.default.")


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    path = write(tmp_path, "\n".join(lines) + "\nplugin_locations: [/p]\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert time.monotonic() - started < 5.0
    assert str(info.value).startswith(f"{path}: configuration expands to more than")
    assert "alias bomb" in str(info.value)


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "a: &a [*a]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: ")


def test_small_aliases_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path, "base: &b {x: 1}\nextra_config: {one: *b, two: *b}\n")
    config = load_config(path, env={})
    assert config.extra_config == {"one": {"x": 1}, "two": {"x": 1}}


def test_file_larger_than_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.write(b"# " + b"x" * (17 << 20) + b"\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert str(info.value) == f"{path}: configuration is larger than 16 MiB"


# ---------------------------------------------------------------------------------------------
# dicts and LMCache's config object


def test_plain_dict() -> None:
    config = coerce_config({"plugin_locations": "/p", "extra_config": {"k": 1}, "other": [1]})
    assert isinstance(config, LauncherConfig)
    assert config.plugin_locations == ["/p"]
    assert config.extra_config == {"k": 1}
    assert config.source == "<dict>"
    assert json.loads(config.to_json()) == {"plugin_locations": ["/p"], "extra_config": {"k": 1},
                                            "other": [1]}


def test_dict_error_names_the_source_and_key() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"extra_config": 3}, "here.yaml")
    assert str(info.value) == "here.yaml: extra_config: expected a mapping, got int"


def test_from_mapping_refuses_a_non_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(["/a"], "x.yaml")  # type: ignore[arg-type]
    assert str(info.value) == "x.yaml: expected a mapping at the top level, got list"


def test_value_that_cannot_become_json_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"extra_config": {("a", "b"): 1}}, "d.yaml")
    assert str(info.value).startswith("d.yaml: cannot be passed to plugins as JSON: ")


def test_values_json_cannot_hold_are_passed_as_text() -> None:
    config = from_mapping({"path": Path("/p")}, "d.yaml")
    assert json.loads(config.to_json())["path"] == "/p"


def test_launcher_config_is_returned_as_is() -> None:
    config = coerce_config({"plugin_locations": ["/p"]})
    assert coerce_config(config) is config


class LMCacheLikeConfig:
    """Shaped like LMCache's LMCacheEngineConfig: attributes plus its own to_json()."""

    def __init__(self, plugin_locations: Any, extra_config: Any = None) -> None:
        self.plugin_locations = plugin_locations
        self.extra_config = extra_config
        self.chunk_size = 256

    def to_json(self) -> str:
        return json.dumps({"chunk_size": self.chunk_size,
                           "plugin_locations": self.plugin_locations,
                           "extra_config": self.extra_config})


def test_lmcache_like_object() -> None:
    obj = LMCacheLikeConfig(["/p1", "/p2"], {"custom_setting": "value"})
    config = coerce_config(obj)
    assert config.plugin_locations == ["/p1", "/p2"]
    assert config.extra_config == {"custom_setting": "value"}
    assert config.data["chunk_size"] == 256
    assert config.to_json() == obj.to_json()  # plugins see LMCache's own JSON, byte for byte


def test_lmcache_like_object_without_locations() -> None:
    config = coerce_config(LMCacheLikeConfig(None))
    assert config.plugin_locations == []
    assert config.extra_config == {}


def test_lmcache_like_object_with_bad_locations_names_its_type() -> None:
    with pytest.raises(ConfigError) as info:
        coerce_config(LMCacheLikeConfig([1]))
    assert str(info.value) == (
        "LMCacheLikeConfig: plugin_locations: expected a list of paths, got [1]")


def test_lmcache_like_object_whose_json_is_not_an_object() -> None:
    class Odd:
        plugin_locations = ["/p"]

        def to_json(self) -> str:
            return "not json"

    config = coerce_config(Odd())
    assert config.plugin_locations == ["/p"]
    assert config.to_json() == "not json"


@pytest.mark.parametrize("value", [None, 3, "lmcache.yaml", ["/p"], object()])
def test_other_objects_are_a_type_error(value: Any) -> None:
    with pytest.raises(TypeError) as info:
        coerce_config(value)
    assert "to_json() and runtime_plugin_locations" in str(info.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=20,
)


@settings(deadline=None, max_examples=50)  # no deadline: a loaded machine is slow, not buggy
@given(st.dictionaries(st.sampled_from(["plugin_locations", "extra_config", "watch_plugins",
                                        "allow_insecure_plugins", "other"]), json_values))
def test_from_mapping_only_raises_config_error(data: dict[str, Any]) -> None:
    try:
        config = from_mapping(data, "prop.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("prop.yaml: ")
    else:
        as_json = json.loads(config.to_json())
        written = as_json.get("plugin_locations", as_json.get("runtime_plugin_locations"))
        assert [os.path.abspath(p) for p in written] == config.plugin_locations
        if "other" in data:
            assert as_json["other"] == data["other"]
