"""Runtimes of command servers: the install steps a spec turns into, where a runtime lives, the
PATH its bridge gets, reuse by stamp, failures named by key and log, and one real install of
mcp-server-time from PyPI into a venv of its own (shared through the runtime cache)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import GatewayConfig, RuntimeConfig, load_config
from gatewayctl import devstack, runtimes
from tests.e2e.helpers import REPO, stack_config

TIME = {"command": ["mcp-server-time", "--local-timezone", "UTC"],
        "runtime": {"pip": ["mcp-server-time==2026.10.19"]}, "count": 1}
# Tests that install for real share one cache, so a checkout (and CI) installs each spec once.
SHARED_CACHE = REPO / ".tools" / "runtimes-cache"


def _config(tmp: Path, **servers: dict[str, Any]) -> GatewayConfig:
    return load_config(stack_config(tmp, servers=servers or {"time": TIME}))


@pytest.fixture(autouse=True)
def _no_shared_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test chooses its runtime folder itself."""
    monkeypatch.delenv(runtimes.CACHE_ENV, raising=False)


def test_pip_spec_becomes_a_venv_and_a_pip_install(tmp_path: Path) -> None:
    """pip: a venv made by the base interpreter, then pip of that venv installs the specs."""
    rt = RuntimeConfig("pip", ("mcp-server-time==2026.10.19", "tzdata"))
    steps = runtimes.install_commands(rt, tmp_path / "rt", python="/usr/bin/python3.11")
    assert steps == [
        ["/usr/bin/python3.11", "-m", "venv", str(tmp_path / "rt" / "venv")],
        [str(tmp_path / "rt" / "venv" / "bin" / "python"), "-m", "pip", "install",
         "--disable-pip-version-check", "--no-input", "--", "mcp-server-time==2026.10.19", "tzdata"]]
    # Never the gateway's own venv.
    assert runtimes.base_python() != sys.executable or sys.prefix == sys.base_prefix


def test_npm_spec_becomes_an_npm_install_with_its_own_prefix(tmp_path: Path) -> None:
    rt = RuntimeConfig("npm", ("@modelcontextprotocol/server-everything@2026.8.31",))
    assert runtimes.install_commands(rt, tmp_path, npm="/usr/bin/npm") == [
        ["/usr/bin/npm", "install", "--prefix", str(tmp_path), "--no-audit", "--no-fund", "--",
         "@modelcontextprotocol/server-everything@2026.8.31"]]


def test_spec_hash_changes_with_what_is_installed() -> None:
    """The stamp's hash: stable for one spec, different for other packages or another installer."""
    pip = RuntimeConfig("pip", ("a==1",))
    assert runtimes.spec_hash(pip) == runtimes.spec_hash(RuntimeConfig("pip", ("a==1",)))
    assert runtimes.spec_hash(pip) != runtimes.spec_hash(RuntimeConfig("pip", ("a==2",)))
    assert runtimes.spec_hash(pip) != runtimes.spec_hash(RuntimeConfig("npm", ("a==1",)))


def test_runtime_folder_is_under_state_dir_or_in_the_cache(tmp_path: Path) -> None:
    """Under state_dir/runtimes/<name>; with $MCP_GATEWAY_RUNTIME_CACHE, cache/<spec hash>, so
    stacks with the same spec share it."""
    config = _config(tmp_path)
    server = config.server("time")
    assert runtimes.runtime_dir(config, server, {}) == Path(config.state_dir) / "runtimes" / "time"
    cached = runtimes.runtime_dir(config, server, {runtimes.CACHE_ENV: str(tmp_path / "cache")})
    assert cached.parent == tmp_path / "cache"
    assert server.runtime is not None and runtimes.spec_hash(server.runtime).startswith(cached.name)


def _fake_program(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / name
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    return program


def test_bridge_path_has_the_runtime_bins_first(tmp_path: Path) -> None:
    """pip: the venv's bin; npm: node_modules/.bin, then the folder of the node npm runs with.
    The plan puts them on the bridge's component without installing anything."""
    node_dir = _fake_program(tmp_path / "nodejs", "node").parent
    npm_rt = RuntimeConfig("npm", ("x@1",))
    assert runtimes.bin_dirs(npm_rt, tmp_path / "rt", str(node_dir)) == (
        str(tmp_path / "rt" / "node_modules" / ".bin"), str(node_dir))
    assert runtimes.bin_dirs(npm_rt, tmp_path / "rt", str(tmp_path / "empty")) == (
        str(tmp_path / "rt" / "node_modules" / ".bin"),)
    config = _config(tmp_path)
    bridge = next(c for c in devstack.plan(config, ext_proc=False) if c.name == "time")
    venv_bin = str(Path(config.state_dir) / "runtimes" / "time" / "venv" / "bin")
    assert bridge.path_prefix == (venv_bin,)
    assert bridge.argv[-4:] == ("--", "mcp-server-time", "--local-timezone", "UTC")
    assert not (Path(config.state_dir) / "runtimes").exists()
    assert runtimes.search_path(config, config.server("time"), {"PATH": "/usr/bin"}) == \
        f"{venv_bin}{os.pathsep}/usr/bin"


def test_command_is_looked_up_like_the_bridge_will(tmp_path: Path) -> None:
    """A bare name on the PATH (runtime bins first); a path relative to the workdir; otherwise
    an error naming servers.<name>.command."""
    config = _config(tmp_path, tool={"command": ["my-tool"], "count": 1},
                     local={"command": ["bin/run.sh"], "count": 1})
    tool, local = config.server("tool"), config.server("local")
    found = _fake_program(tmp_path / "bin", "my-tool")
    assert runtimes.check_command(tool, str(tmp_path / "bin"), str(tmp_path)) == str(found)
    with pytest.raises(devstack.StackError, match=r"servers\.tool\.command: 'my-tool' not found on PATH"):
        runtimes.check_command(tool, str(tmp_path / "nowhere"), str(tmp_path))
    with pytest.raises(devstack.StackError,
                       match=r"servers\.local\.command: 'bin/run\.sh' is not an executable file"):
        runtimes.check_command(local, "", str(tmp_path / "work"))
    script = _fake_program(tmp_path / "work" / "bin", "run.sh")
    assert runtimes.check_command(local, "", str(tmp_path / "work")) == str(script)


def test_up_refuses_a_command_that_does_not_exist(tmp_path: Path) -> None:
    """Stack.prepare stops before starting anything, naming the server's command key."""
    config = _config(tmp_path, nope={"command": ["mcp-server-does-not-exist"], "count": 1})
    with pytest.raises(devstack.StackError,
                       match=r"servers\.nope\.command: 'mcp-server-does-not-exist' not found"):
        devstack.Stack(config, ext_proc=False).prepare()


def _counting(monkeypatch: pytest.MonkeyPatch, counter: Path, code: int = 0) -> None:
    """Install steps replaced by one that appends a line to ``counter`` and exits ``code``."""
    script = (f"import sys; open({str(counter)!r}, 'a').write('x\\n'); print('installer says hi'); "
              f"sys.exit({code})")
    monkeypatch.setattr(runtimes, "install_commands",
                        lambda runtime, directory, **_: [[sys.executable, "-c", script]])


def test_unchanged_runtime_is_reused_and_a_changed_one_reinstalled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path)
    counter = tmp_path / "installs"
    _counting(monkeypatch, counter)
    server = config.server("time")
    told: list[str] = []
    directory = runtimes.ensure(config, server, {"PATH": os.defpath}, told.append)
    runtimes.ensure(config, server, {"PATH": os.defpath}, told.append)
    assert counter.read_text().count("x") == 1
    assert len(told) == 1 and "installing the pip runtime of servers.time" in told[0]
    assert server.runtime is not None
    assert (directory / runtimes.STAMP).read_text().strip() == runtimes.spec_hash(server.runtime)
    log = runtimes.log_file(config, server).read_text()
    assert "installer says hi" in log and "reused" in log
    (tmp_path / "other").mkdir()
    changed = _config(tmp_path / "other", time={**TIME, "runtime": {"pip": ["mcp-server-time"]}})
    changed_server = changed.server("time")
    # The same folder (state_dir differs here, so point both at one cache) with another spec.
    env = {"PATH": os.defpath, runtimes.CACHE_ENV: str(tmp_path / "cache")}
    runtimes.ensure(config, server, env)
    runtimes.ensure(changed, changed_server, env)
    runtimes.ensure(config, server, env)
    assert counter.read_text().count("x") == 3  # one per spec in the cache, no reinstall


def test_a_failed_install_names_the_key_and_the_log(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The installer's exit code is an error naming servers.<name>.runtime and the log; no stamp
    is written, so the next `up` tries again."""
    config = _config(tmp_path)
    server = config.server("time")
    counter = tmp_path / "installs"
    _counting(monkeypatch, counter, code=3)
    log = runtimes.log_file(config, server)
    with pytest.raises(devstack.StackError) as err:
        runtimes.ensure(config, server, {"PATH": os.defpath})
    assert "servers.time.runtime:" in str(err.value) and "exit code 3" in str(err.value)
    assert str(log) in str(err.value) and "installer says hi" in log.read_text()
    with pytest.raises(devstack.StackError):
        runtimes.ensure(config, server, {"PATH": os.defpath})
    assert counter.read_text().count("x") == 2


def test_missing_npm_is_named(tmp_path: Path) -> None:
    config = _config(tmp_path, everything={"command": ["mcp-server-everything"], "count": 1,
                                           "runtime": {"npm": ["@modelcontextprotocol/server-everything"]}})
    with pytest.raises(devstack.StackError,
                       match=r"servers\.everything\.runtime: npm \(Node\.js\) is not installed"):
        runtimes.ensure(config, config.server("everything"), {"PATH": str(tmp_path / "no-bin")})


def test_real_pip_runtime_of_mcp_server_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mcp-server-time from PyPI into its own venv (the shared cache: installed once per
    checkout), found by `up`'s command check, and runnable; the gateway's venv stays without it."""
    monkeypatch.setenv(runtimes.CACHE_ENV, str(SHARED_CACHE))
    config = _config(tmp_path)
    server = config.server("time")
    directory = runtimes.ensure(config, server)
    assert directory.parent == SHARED_CACHE
    program = runtimes.check_command(server, runtimes.search_path(config, server), str(tmp_path))
    assert program == str(directory / "venv" / "bin" / "mcp-server-time")
    venv_python = directory / "venv" / "bin" / "python"
    probe = subprocess.run([str(venv_python), "-c", "import mcp_server_time, sys; print(sys.prefix)"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert probe.stdout.strip() == str(directory / "venv")
    assert importlib.util.find_spec("mcp_server_time") is None
    devstack.Stack(config, ext_proc=False).prepare_commands()  # reused, and the command resolves
    assert "reused" in runtimes.log_file(config, server).read_text()
