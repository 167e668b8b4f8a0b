"""migctl's settings (client.api): command-line flag > environment variable > config file >
default, where the config file is found, and errors that name the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from migctl.client import api, cli


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty MIGCTL_HOME and XDG_CONFIG_HOME; no settings in the environment."""
    for name in ("MIGCTL_CONFIG", "MIGCTL_INVENTORY", "MIGCTL_TLS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(api, "MIGCTL_HOME", tmp_path / "home")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_a_config_file(home: Path) -> None:
    assert api.config_path() is None
    assert api.default_inventory() == home / "inventory.json"
    assert api.default_tls_dir() == home / "tls"


def test_the_xdg_config_file_relative_to_its_folder(home: Path, tmp_path: Path) -> None:
    config = _write(tmp_path / "xdg" / "migctl" / "config.toml",
                    'inventory = "nodes.json"\ntls_dir = "/etc/migctl/tls"\n')
    assert api.config_path() == config
    assert api.default_inventory() == config.parent / "nodes.json"
    assert api.default_tls_dir() == Path("/etc/migctl/tls")


def test_the_migctl_home_file_comes_first_and_migctl_config_overrides(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "xdg" / "migctl" / "config.toml", 'inventory = "/xdg.json"\n')
    _write(home / "config.toml", 'inventory = "/home.json"\n')
    assert api.default_inventory() == Path("/home.json")
    named = _write(tmp_path / "elsewhere.toml", 'inventory = "/named.json"\n')
    monkeypatch.setenv("MIGCTL_CONFIG", str(named))
    assert api.default_inventory() == Path("/named.json")


def test_the_environment_beats_the_config_file(home: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _write(home / "config.toml", 'inventory = "/config.json"\ntls_dir = "/config-tls"\n')
    monkeypatch.setenv("MIGCTL_INVENTORY", "/env.json")
    assert api.default_inventory() == Path("/env.json")
    assert api.default_tls_dir() == Path("/config-tls")
    monkeypatch.setenv("MIGCTL_TLS_DIR", "/env-tls")
    assert api.default_tls_dir() == Path("/env-tls")


def _inventory(path: Path, node: str) -> Path:
    return _write(path, json.dumps({"nodes": {node: {"address": "127.0.0.1:1"}}}))


def test_flags_beat_the_environment_and_the_config_file(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(home / "config.toml",
           f'inventory = "{_inventory(tmp_path / "config.json", "fromConfig")}"\n'
           'tls_dir = "/config-tls"\n')
    assert set(api.Inventory.load().nodes) == {"fromConfig"}
    assert api.Inventory.load().tls_dir == Path("/config-tls")
    monkeypatch.setenv("MIGCTL_INVENTORY", str(_inventory(tmp_path / "env.json", "fromEnv")))
    monkeypatch.setenv("MIGCTL_TLS_DIR", "/env-tls")
    assert set(api.Inventory.load().nodes) == {"fromEnv"}
    assert api.Inventory.load().tls_dir == Path("/env-tls")
    flagged = api.Inventory.load(_inventory(tmp_path / "flag.json", "fromFlag"), Path("/flag"))
    assert (set(flagged.nodes), flagged.tls_dir) == ({"fromFlag"}, Path("/flag"))


def test_the_cli_takes_its_flags_first(home: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Which TLS folder `migctl nodes` used shows in the error about its missing files."""
    _write(home / "config.toml", 'tls_dir = "/config-tls"\n')
    inventory = _inventory(tmp_path / "inv.json", "nodeA")

    def used_tls_dir(*flags: str) -> str:
        with pytest.raises(SystemExit):
            cli.main(["--inventory", str(inventory), *flags, "nodes"])
        return capsys.readouterr().err.split("TLS file(s) missing: ")[1].split("/ca.crt")[0]

    assert used_tls_dir() == "/config-tls"
    monkeypatch.setenv("MIGCTL_TLS_DIR", "/env-tls")
    assert used_tls_dir() == "/env-tls"
    assert used_tls_dir("--tls-dir", "/flag-tls") == "/flag-tls"


@pytest.mark.parametrize(("text", "words"), [
    ('inventory = "a.json"\ntls_dirr = "x"\n', "unknown key 'tls_dirr'"),
    ("inventory = 3\n", "inventory must be a path in quotes, not 3"),
    ('tls_dir = ""\n', "tls_dir must be a path in quotes"),
    ('[tls_dir]\npath = "x"\n', "tls_dir must be a path in quotes"),
    ("inventory = /etc/x\n", "is not valid TOML: Invalid value (at line 1, column 13)"),
])
def test_a_bad_config_file_names_the_file_and_the_key(home: Path, text: str,
                                                       words: str) -> None:
    config = _write(home / "config.toml", text)
    with pytest.raises(api.MigctlError) as err:
        api.default_inventory()
    assert f"config file {config}" in str(err.value)
    assert words in str(err.value)


def test_migctl_config_naming_a_missing_file(home: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIGCTL_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(api.MigctlError, match=r"config file .*nope\.toml does not exist"):
        api.default_tls_dir()


def test_an_inventorys_relative_tls_dir_is_beside_it_wherever_the_command_runs(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose lab's inventory says "tls"; it is read through a link in another folder
    (lab/compose/inventory.json -> state/inventory.json) from any working directory."""
    state = tmp_path / "lab" / "state"
    _write(state / "inventory.json", json.dumps({"tls_dir": "tls", "nodes": {}}))
    (tmp_path / "lab" / "inventory.json").symlink_to("state/inventory.json")
    monkeypatch.chdir(home)
    assert api.Inventory.load(tmp_path / "lab" / "inventory.json").tls_dir == state / "tls"
    _write(state / "inventory.json", json.dumps({"tls_dir": "/abs/tls", "nodes": {}}))
    assert api.Inventory.load(state / "inventory.json").tls_dir == Path("/abs/tls")
