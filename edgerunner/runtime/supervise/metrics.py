"""Prometheus text exposition of the daemon's counters and gauges."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgerunner.runtime.health import Health

if TYPE_CHECKING:  # the daemon imports this before the scheduler (while the weights load)
    from edgerunner.runtime.scheduler import Stats

MIB = 2**20


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels.items()
    )
    return "{" + inner + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str,
               samples: list[tuple[dict[str, Any], float | None]]) -> None:
        present = [(labels, value) for labels, value in samples if value is not None]
        if not present:
            return
        self.lines.append(f"# HELP edgerunner_{name} {help_text}")
        self.lines.append(f"# TYPE edgerunner_{name} {kind}")
        for labels, value in present:
            self.lines.append(f"edgerunner_{name}{_labels(labels)} {value:g}")


def render_metrics(stats: Stats, health: Health) -> str:
    """The /metrics body from the scheduler's counters and the daemon's Health."""
    w = _Writer()
    memory, queue, plan = health.memory, health.queue, health.plan

    def mib(value: float | None) -> float | None:
        return None if value is None else float(value) * MIB

    w.metric("info", "gauge", "Served model and plan",
             [({"model": health.model, "quant": plan.quant, "n_ctx": plan.n_ctx,
                "version": health.version}, 1)])
    w.metric("up", "gauge", "1 while accepting work", [({}, float(health.accepting))])
    w.metric("requests_total", "counter", "Requests queued", [({}, stats.submitted)])
    w.metric("requests_completed_total", "counter", "Requests answered", [({}, stats.completed)])
    w.metric("requests_failed_total", "counter", "Queued requests that ended in an error",
             [({"code": code}, n) for code, n in sorted(stats.failed.items())])
    w.metric("requests_refused_total", "counter", "Requests refused before queueing",
             [({"code": code}, n) for code, n in sorted(stats.refused.items())])
    w.metric("prompt_tokens_total", "counter", "Prompt tokens processed",
             [({}, stats.prompt_tokens)])
    w.metric("completion_tokens_total", "counter", "Tokens generated",
             [({}, stats.completion_tokens)])
    w.metric("generation_seconds_total", "counter", "Time the worker spent generating",
             [({}, stats.generation_seconds)])
    w.metric("queue_depth", "gauge", "Requests waiting", [({}, queue.depth)])
    w.metric("queue_capacity", "gauge", "Queue depth limit", [({}, queue.max)])
    w.metric("busy", "gauge", "1 while generating", [({}, float(bool(queue.running)))])
    w.metric("slots_in_use", "gauge", "Requests decoding together now", [({}, queue.running)])
    w.metric("slots", "gauge", "Requests that can decode together (n_parallel)",
             [({}, queue.slots)])
    w.metric("prefix_cache_hits_total", "counter",
             "Prompts that reused a cached prefix's KV cells", [({}, stats.prefix_cache_hits)])
    w.metric("prefix_cache_misses_total", "counter",
             "Prompts that found no cached prefix to reuse", [({}, stats.prefix_cache_misses)])
    w.metric("prefix_cache_tokens_total", "counter",
             "Prompt tokens taken from the prefix cache instead of evaluated",
             [({}, stats.prefix_cache_tokens)])
    w.metric("rss_bytes", "gauge", "Resident set size now", [({}, mib(memory.rss_mb))])
    w.metric("rss_peak_bytes", "gauge", "Highest RSS seen", [({}, mib(memory.peak_rss_mb))])
    w.metric("rss_predicted_bytes", "gauge", "Plan's predicted peak RSS",
             [({}, mib(memory.predicted_mb))])
    w.metric("rss_ceiling_bytes", "gauge", "RSS that makes the daemon drain and exit",
             [({}, mib(memory.rss_ceiling_mb))])
    w.metric("memory_headroom_bytes", "gauge",
             "min(MemAvailable, cgroup limit - usage without clean unmapped page cache)",
             [({}, mib(memory.headroom_mb))])
    w.metric("memory_pressure", "gauge", "1 while new work is refused for memory",
             [({}, float(memory.guard == "pressure"))])
    w.metric("psi_memory_full_avg10", "gauge", "Memory PSI full avg10 (%)",
             [({}, memory.psi_full_avg10)])
    w.metric("temperature_celsius", "gauge", "Hottest thermal zone",
             [({}, health.temperature_c)])
    flags = health.throttled
    if flags is not None:
        w.metric("throttled", "gauge",
                 "1 while the CPU is held back (firmware throttling, frequency cap or soft "
                 "temperature limit, or the thermal governor at hot)",
                 [({}, float(health.slowed))])
        w.metric("under_voltage", "gauge", "1 while the supply is below 4.63 V",
                 [({}, float(flags.under_voltage))])
        w.metric("throttle_flag", "gauge",
                 "Each bit of the firmware's get_throttled word (*_occurred: since boot)",
                 [({"flag": k}, float(v)) for k, v in flags.model_dump().items()
                  if isinstance(v, bool)])
    w.metric("model_loaded", "gauge", "1 while the weights are in memory",
             [({}, float(health.loaded))])
    return "\n".join(w.lines) + "\n"
