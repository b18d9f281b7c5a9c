"""Prometheus exporter of the served process: CPU seconds, memory, threads and open files.

Each process (scheduler and every worker) gets its own exporter, on port
``extra_config.metrics_port + worker_id`` (``metrics_port`` itself when there is no worker ID);
``metrics_port`` may also map roles to base ports (``{scheduler: 9400, worker: 9401}``) so that a
scheduler and its workers can share one host. It listens on ``extra_config.metrics_addr``
(default 0.0.0.0). The values are read with psutil from the process this plugin serves
(LMCACHE_PLUGIN_PARENT_PID) at each scrape, so they are never stale, and labelled with ``role``
and ``worker_id`` (-1 when there is none). ``lmcache_process_up`` drops to 0 when that process is
gone: alert on it.

No shebang: the launcher runs it with its own Python, where plugin-launcher[examples] is installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from plugin_launcher.plugin import PluginContext, PluginEnvironmentError, run

METRICS = {  # name: (type, help); a counter is exposed with a _total suffix
    "lmcache_process_cpu_seconds": ("counter", "User + system CPU time of the served process"),
    "lmcache_process_resident_memory_bytes": ("gauge", "Resident memory of the served process"),
    "lmcache_process_threads": ("gauge", "Threads of the served process"),
    "lmcache_process_open_fds": ("gauge", "Open files, sockets and pipes of the served process"),
    "lmcache_process_start_time_seconds": ("gauge", "Start of the served process, Unix time"),
}


def read(process: Any) -> dict[str, float]:
    """One consistent reading of a psutil.Process (oneshot caches /proc between the calls)."""
    with process.oneshot():
        cpu = process.cpu_times()
        return {
            "lmcache_process_cpu_seconds": cpu.user + cpu.system,
            "lmcache_process_resident_memory_bytes": process.memory_info().rss,
            "lmcache_process_threads": process.num_threads(),
            "lmcache_process_open_fds": process.num_fds(),
            "lmcache_process_start_time_seconds": process.create_time(),
        }


def role_base_port(ctx: PluginContext) -> int | None:
    """``metrics_port``: one base port, or a base port per role (``{scheduler: 9400, ...}``)."""
    setting = ctx.extra_config.get("metrics_port")
    if not isinstance(setting, dict):
        return ctx.option("metrics_port", int, minimum=1, maximum=65535)
    by_role = {str(role).upper(): port for role, port in setting.items()}
    port = by_role.get(ctx.role)
    if port is None:
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PluginEnvironmentError(f"extra_config.metrics_port.{ctx.role.lower()}: expected an "
                                     f"integer from 1 to 65535, got {port!r}")
    return port


def main(ctx: PluginContext) -> int:
    base_port = role_base_port(ctx)
    if base_port is None:
        ctx.log("set extra_config.metrics_port to export this process's metrics; exiting")
        return 0
    addr = ctx.option("metrics_addr", str, "0.0.0.0")
    port = base_port + (ctx.worker_id or 0)
    if ctx.parent_pid is None:
        ctx.log("LMCACHE_PLUGIN_PARENT_PID is not set: no process to watch", error=True)
        return 2

    import psutil
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

    process = psutil.Process(ctx.parent_pid)
    label_names = ["role", "worker_id"]
    label_values = [ctx.role, str(-1 if ctx.worker_id is None else ctx.worker_id)]

    class ServedProcessCollector:
        """A custom collector: prometheus_client calls collect() on every scrape."""

        def collect(self) -> Iterator[Metric]:
            try:
                values = read(process)
            except psutil.Error:  # gone (or its PID reused by someone else's process)
                values = {}
            up = GaugeMetricFamily(
                "lmcache_process_up", "1 while the served process exists", labels=label_names
            )
            up.add_metric(label_values, 1 if values else 0)
            yield up
            for name, value in values.items():
                kind, doc = METRICS[name]
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                metric = family(name, doc, labels=label_names)
                metric.add_metric(label_values, value)
                yield metric

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServedProcessCollector())
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        ctx.log(f"cannot listen on {addr}:{port}: {exc}", error=True)
        return 1
    ctx.log(f"exporting metrics of PID {ctx.parent_pid} on http://{addr}:{port}/metrics")
    ctx.stopping.wait()
    return 0


if __name__ == "__main__":
    run(main)
