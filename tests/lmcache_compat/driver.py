"""Runs one of LMCache's own launcher call sites, unchanged, with LMCache's launcher or ours.

    driver.py RELEASE SITE MODE ROLE WORKER_ID WORKER_COUNT PLUGIN_DIR OUT_DIR

RELEASE: the LMCache release on PYTHONPATH (0.5.6 or 0.3.10).  SITE:
  factory  0.5.6 ``VllmServiceFactory.maybe_create_runtime_plugin_launcher`` (vLLM integration)
  adapter  0.3.10 the launcher block of ``LMCacheConnectorV1Impl.__init__``
  mp       0.5.6 ``MPRuntimePluginLauncher`` (the MP server; role None)
The modules around these call sites need torch, vLLM and CUDA, so the call site's own source is
taken from the installed wheel with ``ast`` and executed as it is, with the launcher class bound
by the module's own import line.  MODE ``lmcache`` runs it as LMCache ships; ``drop-in`` calls
``plugin_launcher.lmcache.install()`` first, before LMCache is imported.  Every plugin writes its
environment to OUT_DIR; the driver prints one JSON object with what happened.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import json
import logging
import os
import signal
import sys
import textwrap
import time
import types
from pathlib import Path
from typing import Any

import stubs

RELEASE, SITE, MODE, ROLE, WORKER_ID, WORKER_COUNT, PLUGIN_DIR, OUT_DIR = sys.argv[1:9]
INSTANCE_ID = "plugin-launcher-compat-test"  # to_json() is then the same in every process
EXTRA = {"marker": "xyz-123", "plugin.frontend.heartbeat_url": "http://127.0.0.1:1/hb"}


class KVConnectorRole(enum.Enum):  # vLLM's (vllm/distributed/kv_transfer/kv_connector/v1/base.py)
    SCHEDULER = 0
    WORKER = 1


@dataclasses.dataclass
class MPServerConfig:  # the fields LMCache's MP example plugins read
    host: str = "localhost"
    port: int = 5555
    chunk_size: int = 256


@dataclasses.dataclass
class HTTPConfig:
    http_host: str = "127.0.0.1"
    http_port: int = 8085


def lmcache_source(relative: str) -> tuple[str, ast.Module]:
    import lmcache

    path = Path(lmcache.__file__).parent / relative
    text = path.read_text()
    return text, ast.parse(text)


def import_line(tree: ast.Module, text: str, name: str) -> str:
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(a.name == name for a in node.names):
            return ast.get_source_segment(text, node) or ""
    raise LookupError(f"no import of {name}")


def function_source(tree: ast.AST, text: str, cls: str | None, name: str) -> str:
    for node in ast.walk(tree):
        if cls is not None and not (isinstance(node, ast.ClassDef) and node.name == cls):
            continue
        body = node.body if isinstance(node, ast.ClassDef) else getattr(tree, "body", [])
        for item in body:
            if isinstance(item, ast.FunctionDef) and item.name == name:
                return textwrap.dedent(ast.get_source_segment(text, item, padded=True) or "")
    raise LookupError(f"no function {cls}.{name}")


def make_config() -> Any:
    from lmcache.v1.config import LMCacheEngineConfig

    key = "runtime_plugin_locations" if RELEASE >= "0.4" else "plugin_locations"
    return LMCacheEngineConfig.from_defaults(
        lmcache_instance_id=INSTANCE_ID, extra_config=EXTRA, **{key: [PLUGIN_DIR]})


def role_value() -> str | None:
    return None if ROLE == "None" else ROLE


def site_factory() -> Any:
    """0.5.6: the vLLM service factory builds the launcher; LMCacheManager then launches it."""
    text, tree = lmcache_source("integration/vllm/vllm_service_factory.py")
    utils_text, utils_tree = lmcache_source("integration/vllm/utils.py")
    utils = types.ModuleType("lmcache.integration.vllm.utils")
    exec(function_source(utils_tree, utils_text, None, "is_dp_rank0"), utils.__dict__)
    sys.modules[utils.__name__] = utils  # the real module imports torch; is_dp_rank0 does not
    namespace: dict[str, Any] = {"Optional": __import__("typing").Optional}
    exec(import_line(tree, text, "RuntimePluginLauncher"), namespace)
    exec(function_source(tree, text, "VllmServiceFactory", "maybe_create_runtime_plugin_launcher"),
         namespace)
    worker_id = int(WORKER_ID)
    factory = types.SimpleNamespace(
        lmcache_config=make_config(), role=role_value(),
        vllm_config=types.SimpleNamespace(parallel_config=types.SimpleNamespace(
            tensor_parallel_size=int(WORKER_COUNT), data_parallel_rank_local=0)),
        lmcache_engine=None if worker_id < 0 else object(),
        metadata=None if worker_id < 0 else types.SimpleNamespace(worker_id=worker_id))
    launcher = namespace["maybe_create_runtime_plugin_launcher"](factory)
    launcher.launch_plugins()  # LMCacheManager.start_services
    return launcher


def site_adapter() -> Any:
    """0.3.10: LMCacheConnectorV1Impl.__init__ builds and launches the launcher itself."""
    text, tree = lmcache_source("integration/vllm/vllm_v1_adapter.py")
    block = None
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "data_parallel_rank_local == 0" in ast.unparse(node.test):
            block = textwrap.dedent(ast.get_source_segment(text, node, padded=True) or "")
    assert block is not None, "launcher block not found"

    class InternalAPIServer:  # the block starts it first; not what is tested here
        def __init__(self, connector: Any) -> None:
            pass

        def start(self) -> None:
            pass

    namespace: dict[str, Any] = {"InternalAPIServer": InternalAPIServer}
    exec(import_line(tree, text, "PluginLauncher"), namespace)
    worker_id = int(WORKER_ID)
    connector = types.SimpleNamespace(
        config=make_config(), worker_count=int(WORKER_COUNT),
        lmcache_engine=None if worker_id < 0 else types.SimpleNamespace(
            metadata=types.SimpleNamespace(worker_id=worker_id)))
    local = {"self": connector, "role": KVConnectorRole[ROLE.upper()],
             "vllm_config": types.SimpleNamespace(parallel_config=types.SimpleNamespace(
                 data_parallel_rank_local=0))}
    exec(block, namespace, local)
    return connector.plugin_launcher


def site_mp() -> Any:
    """0.5.6: the MP server's lifespan builds MPRuntimePluginLauncher and launches it."""
    from lmcache.v1.multiprocess.mp_runtime_plugin_launcher import MPRuntimePluginLauncher

    launcher = MPRuntimePluginLauncher(
        runtime_plugin_config=types.SimpleNamespace(locations=[PLUGIN_DIR], extra_config=EXTRA),
        mp_config=MPServerConfig(), storage_manager_config=MPServerConfig(port=0),
        obs_config=MPServerConfig(port=1), http_config=HTTPConfig())
    launcher.launch_plugins()
    return launcher


def main() -> None:
    stubs.install(["requests", "torch"] if RELEASE < "0.4" else ["requests"])
    os.environ["PLUGIN_TEST_OUT"] = OUT_DIR
    warnings: list[str] = []
    if MODE != "lmcache":

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                warnings.append(record.getMessage())

        logging.getLogger("plugin_launcher.lmcache").addHandler(Keep(logging.WARNING))
    if MODE == "drop-in":  # "wrapped": plugin-launcher-lmcache installed it before we started
        import plugin_launcher.lmcache

        plugin_launcher.lmcache.install()
    launcher = {"factory": site_factory, "adapter": site_adapter, "mp": site_mp}[SITE]()
    inner = getattr(launcher, "_inner", launcher)  # the MP wrapper holds the real launcher
    processes = list(inner.plugin_processes)
    started = len(processes)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every plugin has written its file, or has ended
        dumped = {json.loads(p.read_text())["pid"] for p in Path(OUT_DIR).glob("*.json")}
        if all(p.pid in dumped or p.poll() is not None for p in processes):
            break
        time.sleep(0.02)
    plugins = {p.stem: json.loads(p.read_text()) for p in Path(OUT_DIR).glob("*.json")}
    launcher.stop_plugins()
    for env in plugins.values():  # LMCache's own stop only sends SIGTERM: make sure
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(env["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        else:
            os.kill(env["pid"], signal.SIGKILL)
    print(json.dumps({
        "class": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "started": started,
        "plugins": plugins,
        "warnings": warnings,
    }))


if __name__ == "__main__":
    main()
