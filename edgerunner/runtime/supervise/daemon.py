"""The daemon's lifecycle: fit the plan to the memory there is, load, serve, drain, exit.

Its exit codes are edgerunner.errors.ExitCode, the one table the CLI and `serve --help` use
too (systemd's Restart=on-failure restarts on any non-zero one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgerunner import __version__
from edgerunner.bundle.manifest import BundleManifest
from edgerunner.bundle.settings import ServeConfig
from edgerunner.bundle.stamp import state_dir
from edgerunner.bundle.store import Bundle
from edgerunner.errors import ConfigError, ExitCode
from edgerunner.host.cpu import CpuBudget, cpu_budget, decode_threads, host_cpu_features
from edgerunner.host.memory import MemoryProbe, MemorySnapshot
from edgerunner.pack.isa import repack_isa
from edgerunner.runtime.engine.predict import predict_totals, weights_saving_mb
from edgerunner.runtime.engine.preflight import (
    PreflightError,
    Verdict,
    preflight,
    serving_features,
)
from edgerunner.runtime.engine.weights import open_in_background, served_plan
from edgerunner.runtime.health import (
    CpuHealth,
    DaemonState,
    Health,
    MemoryHealth,
    PrefixCacheHealth,
    QueueHealth,
    ServedModel,
)
from edgerunner.runtime.supervise.fit import Fit, fit_plan, scaled_estimate
from edgerunner.runtime.supervise.metrics import render_metrics
from edgerunner.runtime.supervise.notify import (
    Heartbeat,
    Notifier,
    Watchdog,
    format_status,
    watchdog_interval,
)
from edgerunner.runtime.supervise.thermal import ThermalGovernor, ThrottleFlags, read_thermal

if TYPE_CHECKING:  # imported while llama.cpp reads the weights (Daemon._start)
    from edgerunner.runtime.engine.core import Engine
    from edgerunner.runtime.http.server import HttpTransport
    from edgerunner.runtime.scheduler import Scheduler
    from edgerunner.runtime.supervise.memory_guard import MemoryGuard

logger = logging.getLogger(__name__)

RSS_CEILING_FACTOR = 1.5  # default ceiling over the predicted peak when config leaves it unset


class Transport(Protocol):
    """What a second transport (MQTT) offers the daemon: built with the scheduler, then started."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def memory_estimator(bundle: Bundle) -> Callable[[int], float]:
    """Predicted MiB at another n_ctx, anchored at the manifest's own prediction.

    Other sizes come from edgerunner.pack.memory in a child process (see
    runtime/engine/predict.py), asked only when a size other than the plan's is needed; if that
    fails, the manifest's KV cache is scaled instead.
    """
    manifest = bundle.manifest
    plan = manifest.plan
    anchor = manifest.prediction.memory.total_mb
    scaled = scaled_estimate(manifest.prediction.memory, plan.n_ctx)
    cache: dict[int, float] = {}

    def estimate(n_ctx: int) -> float:
        if n_ctx == plan.n_ctx:
            return anchor
        if not cache:
            sizes = sorted({*range(256, plan.n_ctx, 256), plan.n_ctx, n_ctx})
            try:
                cache.update(predict_totals(bundle.model_path, plan, sizes))
            except Exception as exc:  # the memory model is an improvement, not a requirement
                logger.warning("memory model unavailable (%s); scaling the manifest's KV "
                               "prediction instead", exc)
                cache.update({n: scaled(n) for n in sizes})
                cache[plan.n_ctx] = anchor
        if n_ctx not in cache:
            cache[n_ctx] = scaled(n_ctx) - scaled(plan.n_ctx) + cache[plan.n_ctx]
        return anchor + cache[n_ctx] - cache[plan.n_ctx]

    return estimate


def seconds_since_exec(proc: Path = Path("/proc")) -> float | None:
    """How long ago this process was started (exec), from /proc; None where there is none."""
    try:
        stat = (proc / "self/stat").read_text()
        uptime = float((proc / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    # field 22, starttime, in clock ticks since boot; the command name (2) may hold spaces
    ticks = int(stat[stat.rindex(")") + 2:].split()[19])
    return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))


class Daemon:
    """One bundle served under one config. `run()` returns the process exit code."""

    def __init__(self, bundle: Bundle, config: ServeConfig) -> None:
        self.bundle = bundle
        self.config = config
        self.manifest: BundleManifest = bundle.manifest
        self.served = ServedModel.of(bundle.manifest)
        self.state: DaemonState = "starting"
        self.started_at = time.time()
        self.exit_code: ExitCode = ExitCode.OK
        self.fit: Fit | None = None
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.guard: MemoryGuard | None = None
        self.http: HttpTransport | None = None
        self.transports: list[Transport] = []
        self.probe = MemoryProbe(config.guard_root)
        self._estimate = memory_estimator(bundle)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.notifier = Notifier()
        self.heartbeat: Heartbeat | None = None
        self.watchdog: Watchdog | None = None
        self.governor: ThermalGovernor | None = None
        self.temperature_c: float | None = None
        self.throttle: ThrottleFlags | None = None
        self.worker_stop_s: float | None = None  # a cancelled job's time to let go (None: the
        # scheduler's WORKER_STOP_S)
        self.cpus: CpuBudget = cpu_budget(config.guard_root)
        self.n_threads = self._choose_threads()
        self.verdict: Verdict | None = None
        self._repack_saving_mb = 0.0  # weights the serving CPU holds less than the profile's

    # -- lifecycle ----------------------------------------------------------------------------

    def fit_memory(self) -> Fit:
        """Start-up guard: the plan as-is, shrunk to fit, or NoFitError (exit code 3)."""
        snap = self.probe.read()
        memory = self.manifest.prediction.memory
        plan = self.manifest.plan
        wanted = self.config.n_ctx
        if wanted is not None and wanted != plan.n_ctx:
            if wanted > plan.n_ctx:
                raise ConfigError(
                    f"n_ctx {wanted} is larger than the {plan.n_ctx} this bundle was planned for",
                    "re-pack with a larger --max-ctx, or leave n_ctx unset")
            plan = plan.model_copy(update={"n_ctx": wanted})
        fit = fit_plan(plan, self._estimate_here, snap.headroom_mb,
                       self.config.memory_reserve_mb, strict=self.config.strict,
                       already_resident_mb=min(snap.rss_mb, memory.overhead_mb))
        log = logger.warning if fit.shrunk else logger.info
        log("memory fit: %s (%s)", fit.reason, snap.source)
        return fit

    def _estimate_here(self, n_ctx: int) -> float:
        return self._estimate(n_ctx) - self._repack_saving_mb

    def _choose_threads(self) -> int:
        planned = self.manifest.plan.n_threads
        if self.config.n_threads is not None:
            if self.config.n_threads > self.cpus.cpus:
                logger.warning("threads: %d asked for, but this process may use %d CPUs (%s)",
                               self.config.n_threads, self.cpus.cpus, self.cpus.describe())
            return self.config.n_threads
        threads = decode_threads(planned, self.cpus)
        logger.info("threads: %d (plan %d; %s)", threads, planned, self.cpus.describe())
        return threads

    def run_preflight(self) -> Verdict:
        """Prove llama.cpp decodes here (cached); PreflightError if no path does."""
        verdict = preflight(self.bundle.model_path, self.manifest.files["model.gguf"].sha256,
                            self.manifest.plan, self.n_threads,
                            timeout_s=self._expected_load_s() + 120)
        how = "cached" if verdict.cached else f"{verdict.seconds:.2f} s"
        if verdict.extra_bufts:
            logger.info("preflight: llama.cpp decodes here with extra buffer types (%s)", how)
        else:
            logger.warning("preflight: llama.cpp died with extra buffer types on (%s); serving "
                           "without them: no AMX, no weight repacking (%s)",
                           ", ".join(verdict.failures), how)
        # llama.cpp repacks weights by the rules of the CPU that serves, not the profile's
        features = (serving_features(verdict.system_info, host_cpu_features())
                    if verdict.extra_bufts else [])
        try:
            self._repack_saving_mb = weights_saving_mb(self.manifest, self.bundle.model_path,
                                                       features)
        except Exception as exc:  # the memory model is an improvement, not a requirement
            logger.warning("weights on this CPU unknown (%s); keeping the manifest's prediction",
                           exc)
        if self._repack_saving_mb:
            logger.info("memory: weights predicted for this CPU (%s): %+.1f MiB against the "
                        "profile's (%s)", repack_isa(features), -self._repack_saving_mb,
                        repack_isa(self.manifest.profile.cpu.features))
        return verdict

    async def run(self) -> ExitCode:
        """Load, serve until a signal or the RSS ceiling, drain, clean up; the exit code."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # signals reach only the main thread; tests run the daemon in another one
        signals: tuple[signal.Signals, ...] = (
            (signal.SIGTERM, signal.SIGINT)
            if threading.current_thread() is threading.main_thread() else ())
        for sig in signals:
            self._loop.add_signal_handler(sig, self.request_stop, ExitCode.OK, sig.name)
        if signals:
            # a closed terminal or `kill -HUP` must not drop in-flight requests; the config is
            # read once at start, so there is nothing to reload either
            self._loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            signals += (signal.SIGHUP,)
        try:
            await self._start()
            await self._stop.wait()
        except PreflightError as exc:
            logger.error("%s", exc)
            self.exit_code = ExitCode.PREFLIGHT
        finally:
            await self._shutdown()
            for sig in signals:
                self._loop.remove_signal_handler(sig)
        return self.exit_code

    def _on_sighup(self) -> None:
        logger.warning("SIGHUP ignored: the daemon keeps serving; the config is read at start, "
                       "so restart the daemon (systemctl restart) to apply changes")

    def stop_threadsafe(self, code: ExitCode = ExitCode.OK, why: str = "") -> None:
        """request_stop from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.request_stop, code, why)

    def request_stop(self, code: ExitCode = ExitCode.OK, why: str = "") -> None:
        """Begin a graceful stop (loop thread only); the first non-zero code wins."""
        if self.exit_code == ExitCode.OK:
            self.exit_code = code
        logger.warning("stopping (%s)", why or f"exit code {code}")
        if self._stop is not None:
            self._stop.set()

    async def _start(self) -> None:
        self.state = "loading"
        config = self.config
        # where start-up time goes, logged at ready: exec to here is Python, imports, the
        # bundle check and the config
        phases: dict[str, float] = {}
        since_exec = seconds_since_exec()
        if since_exec is not None:
            phases["exec_s"] = since_exec
        mark = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[name] = now - mark
            mark = now

        self._notify("status", f"preflight: decoding {self.manifest.name} in a child process")
        self._notify("extend_timeout", 2 * self._expected_load_s() + 60)
        self.verdict = verdict = await asyncio.to_thread(self.run_preflight)
        phase("preflight_s")
        self.fit = fit = self.fit_memory()
        phase("fit_s")
        self._notify("status", f"loading {self.manifest.name}")
        self._notify("extend_timeout", self._expected_load_s() + 30)
        plan = served_plan(fit.plan, n_parallel=config.n_parallel)
        opening = open_in_background(self.bundle.model_path, plan, self.n_threads,
                                     verdict.extra_bufts)
        # llama.cpp reads the weights without the GIL, on one core: the serving code is
        # imported on the other meanwhile (this module imports only what decides the plan)
        from edgerunner.runtime.engine.core import Engine
        from edgerunner.runtime.engine.prefix_store import PrefixStore
        from edgerunner.runtime.http.access import raise_nofile_limit
        from edgerunner.runtime.http.server import transport_from_config
        from edgerunner.runtime.scheduler import Scheduler
        from edgerunner.runtime.supervise.memory_guard import MemoryGuard

        raise_nofile_limit()  # each connection is a descriptor; the HTTP cap stays below the limit
        self.engine = Engine(self.bundle.model_path, plan, name=self.manifest.name,
                             n_threads=self.n_threads, extra_bufts=verdict.extra_bufts,
                             prefix_store=PrefixStore(state_dir() / "prefixes" / self.manifest.name,
                                                      self.manifest.files["model.gguf"].sha256))
        phases["imports_s"] = time.perf_counter() - mark  # within load_total_s
        await asyncio.to_thread(self.engine.load, opening)
        phase("load_total_s")
        phases.update(load_s=self.engine.load_seconds, restore_s=self.engine.restore_seconds)
        self._setup_watchdog()
        self._setup_thermal()
        ceiling = config.rss_ceiling_mb or RSS_CEILING_FACTOR * fit.predicted_mb
        self.guard = MemoryGuard(
            self.probe, reserve_mb=config.memory_reserve_mb,
            psi_full_limit=config.psi_full_avg10_limit, rss_ceiling_mb=ceiling,
            poll_s=config.guard_poll_s, on_rss_exceeded=self._on_rss_exceeded,
            on_poll=self._on_poll,
        )
        self.scheduler = Scheduler(
            self.engine, queue_depth=config.queue_depth,
            request_timeout_s=config.request_timeout_s,
            default_max_tokens=config.default_max_tokens, keep_alive_s=config.keep_alive_s,
            admission=self.guard.admit, log_prompts=config.log_prompts,
            heartbeat=self.heartbeat.beat if self.heartbeat is not None else None,
            before_job=self._before_job, reload_budget_s=self._expected_load_s() + 30,
        )
        self.guard.start()
        self.scheduler.start()
        # its first act is a warm-up decode on its own thread: done before READY, so a request
        # right after a (re)start does not wait for it
        await asyncio.to_thread(self.scheduler.warmed.wait, self._expected_load_s() + 60)
        phase("warm_up_s")
        # the API key, Host/Origin checks and connection cap from the config apply here
        self.http = transport_from_config(config, self.scheduler, self.health, self.metrics,
                                          self.served)
        await self.http.start()
        phase("serve_s")
        # ready before MQTT connects, so its first info/state messages say so
        self.state = "ready"
        # load_total_s holds load_s + restore_s, and imports_s beside them; warm_up_s is
        # the worker's first decode, on its own thread
        total = sum(phases.get(k, 0.0) for k in ("exec_s", "preflight_s", "fit_s",
                                                  "load_total_s", "warm_up_s", "serve_s"))
        logger.info("start-up", extra={"event": "startup", "total_s": round(total, 3),
                                       **{k: round(v, 3) for k, v in phases.items()}})
        if config.mqtt.url:
            self._start_mqtt()
        if self.watchdog is not None:
            self.watchdog.start()
        self._notify("ready", self._status_line())
        logger.info("ready: %s on unix:%s (load %.2f s, n_ctx %d)", self.manifest.name,
                    config.socket_path(), self.engine.load_seconds, fit.plan.n_ctx)

    def _start_mqtt(self) -> None:
        assert self.scheduler is not None
        from edgerunner.runtime.mqtt import transport as mqtt

        transport: Transport = mqtt.MqttTransport(self.config.mqtt, self.scheduler, self.health,
                                                   self.served)
        transport.start()
        self.transports.append(transport)

    async def _shutdown(self) -> None:
        self.state = "draining"
        self._notify("stopping", "draining in-flight requests")
        scheduler = self.scheduler
        if scheduler is not None:
            scheduler.stop_accepting()
            clean = await asyncio.to_thread(scheduler.shutdown, self.config.drain_timeout_s,
                                            self.worker_stop_s)
            if not clean:
                logger.warning("drain timeout (%.0f s) passed; cancelled the remaining work",
                               self.config.drain_timeout_s)
        for transport in self.transports:
            try:
                transport.stop()
            except Exception:
                logger.exception("stopping a transport failed")
        if self.http is not None:
            await self.http.stop()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.guard is not None:
            self.guard.stop()
        if self.engine is not None:
            if scheduler is None or scheduler.stopped:
                self.engine.close()
            else:
                # freeing the model under a worker still inside llama.cpp would crash it; the
                # process exit frees the memory instead
                logger.error("the inference worker is still running; leaving the model loaded "
                             "and exiting with an error")
                if self.exit_code == ExitCode.OK:
                    self.exit_code = ExitCode.ERROR
        self.state = "stopped"
        logger.info("stopped with exit code %d", self.exit_code)

    # -- hooks --------------------------------------------------------------------------------

    def _notify(self, method: str, *args: Any) -> None:
        getattr(self.notifier, method)(*args)

    def _expected_load_s(self) -> float:
        size_mb = self.bundle.model_path.stat().st_size / 2**20
        return size_mb / self.manifest.profile.storage.read_mbs

    def _setup_watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        # silent for longer than the ping interval → stop pinging → systemd restarts us
        self.heartbeat = Heartbeat(max_silence=max(interval, 5.0))
        self.watchdog = Watchdog(self.notifier, self.heartbeat.is_alive, interval)

    def _setup_thermal(self) -> None:
        assert self.fit is not None
        base = self.n_threads
        self.governor = ThermalGovernor(self.manifest.profile.thermal, base)

    def _before_job(self, engine: Engine) -> None:
        if self.governor is None:
            return
        state = self.governor.state
        engine.set_threads(state.threads)
        if state.pause_s:
            time.sleep(state.pause_s)  # let a throttling SoC cool between requests

    def _on_poll(self, snap: MemorySnapshot) -> None:
        # the guard thread polls; piggyback temperature and the systemd STATUS line on it
        try:
            reading = read_thermal(self.config.guard_root)
        except Exception:  # a sysfs tree stranger than read_thermal expects: no reading
            logger.debug("thermal read failed", exc_info=True)
        else:
            self.temperature_c = reading.max_c
            self.throttle = reading.throttled
            if self.governor is not None:
                self.governor.update(reading)
        if self.state == "ready":
            self._notify("status", self._status_line())

    def _on_rss_exceeded(self, rss_mb: float, ceiling_mb: float) -> None:
        # called on the guard thread: hand over to the loop, which drains and exits 4
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                self.request_stop, ExitCode.RSS_CEILING,
                f"RSS {rss_mb:.0f} MiB over the {ceiling_mb:.0f} MiB ceiling")

    # -- what /health, /metrics and MQTT info show ---------------------------------------------

    def current_state(self) -> DaemonState:
        if self.state != "ready":
            return self.state
        if self.guard is not None and self.guard.state == "pressure":
            return "pressure"
        if self.engine is not None and not self.engine.loaded:
            return "unloaded"
        return "ready"

    def health(self) -> Health:
        """The daemon's state: the /health document, the MQTT info payload, the metrics' gauges."""
        guard, scheduler, fit, verdict = self.guard, self.scheduler, self.fit, self.verdict
        snap = guard.last if guard is not None else None
        predicted = fit.predicted_mb if fit is not None else None
        rss_now = self.probe.rss_mb()
        engine, stats = self.engine, scheduler.stats if scheduler else None
        return Health(
            state=self.current_state(),
            model=self.manifest.name,
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.time() - self.started_at, 1),
            loaded=engine is not None and engine.loaded,
            plan=fit.plan if fit is not None else self.manifest.plan,
            plan_shrunk=fit.shrunk if fit is not None else False,
            memory=MemoryHealth(
                predicted_mb=None if predicted is None else round(predicted, 1),
                rss_mb=round(rss_now, 1),
                polled_rss_mb=round(snap.rss_mb if snap is not None else rss_now, 1),
                peak_rss_mb=round(guard.peak_rss_mb, 1) if guard else None,
                measured_over_predicted=round(rss_now / predicted, 3) if predicted else None,
                rss_ceiling_mb=(round(guard.rss_ceiling_mb, 1)
                                if guard and guard.rss_ceiling_mb else None),
                headroom_mb=round(snap.headroom_mb, 1) if snap else None,
                headroom_source=snap.source if snap else None,
                reserve_mb=self.config.memory_reserve_mb,
                psi_full_avg10=snap.psi_full_avg10 if snap else None,
                guard=guard.state if guard else None,
                guard_reason=guard.reason if guard else "",
            ),
            queue=QueueHealth(
                depth=scheduler.depth if scheduler else 0,
                max=self.config.queue_depth,
                running=scheduler.running if scheduler else 0,
                slots=scheduler.slots if scheduler else self._n_parallel(),
            ),
            prefix_cache=PrefixCacheHealth(
                cells=engine.prefix_cache_cells if engine else
                self.manifest.plan.prefix_cache_cells,
                hits=stats.prefix_cache_hits if stats else 0,
                misses=stats.prefix_cache_misses if stats else 0,
                tokens_reused=stats.prefix_cache_tokens if stats else 0,
            ),
            temperature_c=self.temperature_c,
            throttled=self.throttle,
            thermal=self.governor.state if self.governor is not None else None,
            cpu=CpuHealth(
                threads=self.n_threads,
                threads_planned=self.manifest.plan.n_threads,
                cpus=self.cpus.cpus,
                cpu_limits=self.cpus.describe(),
                llama_path=verdict.path if verdict is not None else None,
                preflight_cached=verdict.cached if verdict is not None else None,
                preflight_s=verdict.seconds if verdict is not None else None,
                preflight_failures=verdict.failures if verdict is not None else [],
                llama_cpu_features=verdict.system_info if verdict is not None else None,
            ),
        )

    def _n_parallel(self) -> int:
        return self.config.n_parallel or self.manifest.plan.n_parallel

    def metrics(self) -> str:
        """The /metrics text."""
        assert self.scheduler is not None
        return render_metrics(self.scheduler.stats, self.health())

    def _status_line(self) -> str:
        health = self.health()
        return format_status(
            self.manifest.name, health.plan.quant, health.plan.n_ctx, health.queue.depth,
            health.queue.max, health.memory.rss_mb, health.memory.predicted_mb or 0.0,
            self.temperature_c, health.state)


def serve(bundle: Bundle, config: ServeConfig) -> ExitCode:
    """Run the daemon in this thread until it stops; the process exit code."""
    return asyncio.run(Daemon(bundle, config).run())
