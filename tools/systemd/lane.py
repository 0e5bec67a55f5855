"""`make test-systemd`: the edgerunner unit under a real systemd, in a Debian container.

A bookworm rootfs (cache.py) boots under systemd-nspawn with systemd 252 as PID 1
(container.py); edgerunner's wheel goes into its venv, and packed bundles go in through
`edgerunner install --enable`, the health-gated update driving the real systemctl. Then, with
the real systemd, it proves:

- `systemctl start` returns only after READY=1: the socket answers at once, STATUS= is set;
- the socket answers a member of the `edgerunner` group and refuses anyone else;
- under ProtectSystem=strict the daemon writes its preflight verdict into its StateDirectory,
  its socket into its RuntimeDirectory, and the journal shows no read-only-filesystem error;
- the unit's cgroup memory limit (memory.limit_in_bytes) is the MemoryMax the plan rendered;
- `systemd-analyze security` scores the unit (recorded);
- SIGTERM (`systemctl stop`) drains: a streamed answer in flight finishes, the exit is clean;
- an MQTT request in flight across `systemctl restart` is answered;
- a worker that stops making progress stops the watchdog pings, and systemd kills and restarts
  it (Result=watchdog, NRestarts): the fault is injected at the OS boundary, a CPU quota of a
  few percent on the unit's cgroup while one long prompt is evaluated, so the worker spends
  longer inside one llama.cpp call than the watchdog allows (WatchdogSec lowered to 4 s by a
  drop-in; the daemon's heartbeat wants progress every 5 s) — the same thing a wedged or
  starved worker does, without a test hook in the daemon;
- exit 3 (nothing fits: a memory reserve no device has) and exit 5 (the decode preflight dies
  with SIGILL: EDGERUNNER_PREFLIGHT_PYTHON points at a program that does) are not restarted;
- updates through `edgerunner install`: a good bundle commits, one that loads but fails its
  smoke prompt rolls back (the old one answers), an unsigned one is refused before anything
  switches.

Root only. Cold (debootstrap + wheelhouse, cached under ~/.cache/edgerunner/systemd-lane/) and
warm timings are printed at the end; --warm-only exits 0 at once, saying so, when the cache is
cold (CI calls it that way).

    .venv/bin/python tools/systemd/lane.py [--warm-only] [--json FILE] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cache
from container import Container

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TOOLS = ("systemd-nspawn", "nsenter", "debootstrap", "zstd")
SIGILL_PYTHON = ("#!/bin/sh\n# the decode preflight's child, dying as a build for another CPU "
                 "does\nkill -ILL $$\n")
ALICE, BOB = "alice", "bob"
KEYRING = "/etc/edgerunner/keys"


@dataclass
class Lane:
    box: Container
    name: str = ""
    unit: str = ""
    sock: str = ""
    checks: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return ok

    def probe(self, action: str, *args: str, user: str | None = None) -> dict[str, Any]:
        command = ["/opt/edgerunner/bin/python", "/usr/local/lib/edgerunner-lane/probe.py",
                   action, self.sock, *args]
        if user:
            command = ["runuser", "-u", user, "--", *command]
        done = self.box.run(*command, check=False, timeout=600)
        try:
            out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out = {"error": (done.stderr or done.stdout).strip()[-500:]}
        return out

    def show(self, *props: str) -> dict[str, str]:
        return self.box.show(self.unit, *props)

    def wait_ready(self, timeout: float = 180) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.probe("health").get("state") == "ready":
                return True
            time.sleep(0.5)
        return False

    def drop_in(self, text: str | None) -> None:
        # /etc, not /run: nspawn mounts a tmpfs over the container's /run
        path = self.box.rootfs / f"etc/systemd/system/{self.unit}.d/lane.conf"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.box.run("systemctl", "daemon-reload")

    def install(self, bundle: str) -> tuple[int, dict[str, Any], str]:
        done = self.box.run("edgerunner", "install", bundle, "--enable", "--json",
                            check=False, timeout=900)
        data: dict[str, Any] = {}
        text = done.stdout.strip()
        if text.startswith("{"):
            with contextlib.suppress(ValueError):
                data = json.loads(text[: text.rfind("}") + 1])
        return done.returncode, data, done.stderr.strip()


def sequence(data: dict[str, Any]) -> list[str]:
    steps = (data.get("update") or {}).get("steps") or []
    return [step["state"] for step in steps]


# ---------------------------------------------------------------------------- bundles


def bundles(out: Path, key_dir: Path) -> dict[str, Path]:
    """The default model packed for rpi5 and its variants, as .tar archives."""
    from edgerunner.bundle.archive import write_archive
    from edgerunner.bundle.manifest import BundleManifest
    from edgerunner.device.sign import generate_keypair, sign_bundle
    from edgerunner.pack.packer import pack
    from edgerunner.profiles import resolve_profile

    private, _public, _ = generate_keypair(key_dir / "lane.key")
    base = pack(None, resolve_profile("rpi5"), out / "base").path
    made = {}
    for label, smoke_tokens, signed in (("v1", None, True), ("v2", None, True),
                                        ("broken", 2, True), ("unsigned", None, False)):
        copy = out / label / base.name
        shutil.copytree(base, copy)
        manifest = BundleManifest.model_validate_json((copy / "manifest.json").read_text())
        manifest.created = f"{manifest.created} {label}"
        if smoke_tokens is not None:
            manifest.smoke[-1].max_tokens = smoke_tokens  # too few for the JSON it must write
        (copy / "manifest.json").write_text(manifest.model_dump_json(indent=2))
        if signed:
            sign_bundle(copy, private)
        made[label] = write_archive(copy, out / f"{label}.tar", arcname=copy.name)
    made["name"] = Path(base.name)
    return made


def broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = work / "mosquitto.conf"
    conf.write_text(f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                    f"persistence true\npersistence_location {work}/\n")
    process = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return process, port


# ---------------------------------------------------------------------------- checks


def check_install_and_start(lane: Lane) -> None:
    started = time.monotonic()
    rc, data, err = lane.install("/srv/bundles/v1.tar")
    lane.timings["install v1 (gated)"] = time.monotonic() - started
    lane.facts["states: install v1"] = sequence(data)
    lane.check("edgerunner install --enable (first bundle)",
               rc == 0 and sequence(data)[-1:] == ["committed"],
               f"exit {rc}: {' > '.join(sequence(data)) or err[-300:]}")
    lane.box.run("systemctl", "stop", lane.unit)
    started = time.monotonic()
    lane.box.run("systemctl", "start", lane.unit, timeout=600)
    took = time.monotonic() - started
    lane.timings["systemctl start (READY=1)"] = took
    health = lane.probe("health")  # no waiting: start returned, so READY=1 was sent
    props = lane.show("Type", "ActiveState", "SubState", "StatusText")
    lane.check("systemctl start returns after READY=1",
               props["Type"] == "notify" and props["ActiveState"] == "active"
               and health.get("state") == "ready" and bool(props["StatusText"]),
               f"returned in {took:.1f} s; /health right after: {health.get('state')}; "
               f"STATUS={props['StatusText']!r}")


def check_socket_access(lane: Lane) -> None:
    lane.box.run("usermod", "-aG", "edgerunner", ALICE)
    alice = lane.probe("health", user=ALICE)
    bob = lane.probe("health", user=BOB)
    stat = lane.box.run("stat", "-c", "%a %U:%G", lane.sock).stdout.strip()
    lane.check("socket: edgerunner group in, others out",
               alice.get("state") == "ready"
               and "permission denied" in bob.get("error", "").lower()
               and "group 'edgerunner'" in bob.get("error", ""),  # it names the group to join
               f"{lane.sock} {stat}; {ALICE} (group edgerunner): {alice.get('state')}; "
               f"{BOB}: {bob.get('error', 'answered!')[:120]}")


def check_strict_writes(lane: Lane) -> None:
    owned = lane.box.run("find", "/var/lib/edgerunner", "-user", "edgerunner", "-type", "f")
    files = owned.stdout.split()
    verdicts = [f for f in files if "/preflight/" in f]
    journal = lane.box.run("journalctl", "-u", lane.unit, "--no-pager", "-o", "cat").stdout
    readonly = [line for line in journal.splitlines() if "Read-only file system" in line]
    props = lane.show("ProtectSystem", "StateDirectory", "RuntimeDirectory")
    lane.check("ProtectSystem=strict: writes what it must",
               props["ProtectSystem"] == "strict" and bool(verdicts) and not readonly,
               f"files the service wrote under /var/lib/edgerunner: {len(files)} "
               f"({', '.join(Path(f).name for f in verdicts[:2])} preflight); read-only "
               f"errors in the journal: {len(readonly)}")


def check_memory_limit(lane: Lane) -> None:
    unit_text = (lane.box.rootfs / f"etc/systemd/system/{lane.unit}").read_text()
    match = re.search(r"^MemoryMax=(\d+)M$", unit_text, re.M)
    planned = int(match.group(1)) * 1024 * 1024 if match else -1
    props = lane.show("MemoryMax", "ControlGroup", "MemoryCurrent")
    limit_file = f"/sys/fs/cgroup/memory{props['ControlGroup']}/memory.limit_in_bytes"
    done = lane.box.run("cat", limit_file, check=False)
    enforced = int(done.stdout.strip()) if done.returncode == 0 else -1
    lane.facts["memory"] = {"unit MemoryMax": planned, "systemd MemoryMax": props["MemoryMax"],
                            "cgroup limit": enforced, "MemoryCurrent": props["MemoryCurrent"]}
    lane.check("cgroup memory limit = the plan's MemoryMax",
               planned > 0 and enforced == planned == int(props["MemoryMax"]),
               f"unit MemoryMax={planned >> 20} MiB, cgroup memory.limit_in_bytes="
               f"{enforced} ({enforced >> 20 if enforced > 0 else '?'} MiB), "
               f"MemoryCurrent={props['MemoryCurrent']}")


def check_security(lane: Lane) -> None:
    done = lane.box.run("systemd-analyze", "security", "--no-pager", lane.unit, check=False)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", done.stdout)
    lane.facts["security"] = f"{match.group(1)} {match.group(2)}" if match else "?"
    lane.check("systemd-analyze security", match is not None,
               f"overall exposure {lane.facts['security']} (0 = locked down, 10 = exposed)")


def check_drain(lane: Lane) -> None:
    out = lane.probe("drain", lane.unit)
    props = lane.show("ActiveState", "Result", "ExecMainStatus")
    stop = out.get("stop") or {}
    lane.check("SIGTERM drains the answer in flight",
               out.get("finish") in ("stop", "length") and stop.get("rc") == 0
               and props["Result"] == "success" and props["ExecMainStatus"] == "0",
               f"stream ended with finish_reason={out.get('finish')} after {out.get('pieces')} "
               f"pieces; systemctl stop took {stop.get('seconds')} s; Result={props['Result']} "
               f"exit {props['ExecMainStatus']}")
    lane.box.run("systemctl", "start", lane.unit, timeout=600)


def check_mqtt_restart(lane: Lane, port: int) -> None:
    from edgerunner.client.mqtt import MqttChat, wait_for_status

    url = f"mqtt://127.0.0.1:{port}"
    lane.drop_in(f"[Service]\nEnvironment=EDGERUNNER_MQTT__URL={url}\n"
                 "Environment=EDGERUNNER_MQTT__DEVICE_ID=lane\n")
    lane.box.run("systemctl", "restart", lane.unit, timeout=600)
    lane.wait_ready()
    if not wait_for_status(url, "lane", "online", timeout=60):
        env = lane.show("Environment")
        lane.check("MQTT request in flight across systemctl restart is answered", False,
                   f"the daemon never published online on {url} ({env})")
        lane.drop_in(None)
        return
    with MqttChat(url, "lane", timeout=300).connect() as chat:
        before = lane.probe("health").get("pid")
        request = chat.send({"messages": [{"role": "user", "content": "Count to thirty."}],
                             "max_tokens": 96, "temperature": 0.0})
        time.sleep(0.3)
        restart = threading.Thread(
            target=lambda: lane.box.run("systemctl", "restart", lane.unit, timeout=600))
        restart.start()
        try:
            replies = list(chat.replies(request, timeout=300))
            final = replies[-1]
            answered = bool(final.get("choices")) and "error" not in final
            detail = f"finish_reason={final['choices'][0].get('finish_reason')}"
        except Exception as exc:
            answered, detail = False, f"{type(exc).__name__}: {exc}"
        restart.join()
    after = lane.probe("health").get("pid")
    lane.check("MQTT request in flight across systemctl restart is answered",
               answered and before != after,
               f"{detail}; daemon pid {before} -> {after}")
    lane.drop_in(None)
    lane.box.run("systemctl", "restart", lane.unit, timeout=600)


def check_watchdog(lane: Lane) -> None:
    lane.drop_in("[Service]\nWatchdogSec=4\n")
    lane.box.run("systemctl", "restart", lane.unit, timeout=600)
    lane.wait_ready()
    before = int(lane.show("NRestarts")["NRestarts"])
    lane.box.run("systemctl", "set-property", "--runtime", lane.unit, "CPUQuota=3%")
    load = lane.box.popen("/opt/edgerunner/bin/python", "/usr/local/lib/edgerunner-lane/probe.py",
                          "long", lane.sock)
    started = time.monotonic()
    result = ""
    while time.monotonic() - started < 300:
        props = lane.show("Result", "NRestarts", "ActiveState")
        if props["Result"] == "watchdog" or int(props["NRestarts"]) > before:
            result = props["Result"]
            break
        time.sleep(0.5)
    took = time.monotonic() - started
    lane.box.run("systemctl", "set-property", "--runtime", lane.unit, "CPUQuota=")
    load.kill()
    ready = lane.wait_ready(300)
    props = lane.show("NRestarts", "Result")
    journal = lane.box.run("journalctl", "-u", lane.unit, "--no-pager", "-o", "cat").stdout
    withheld = "withholding watchdog pings" in journal
    timeout_seen = "Watchdog timeout" in journal
    lane.check("a worker that stops progressing is killed by the watchdog and restarted",
               result == "watchdog" and int(props["NRestarts"]) > before and ready,
               f"after {took:.0f} s: Result={result or '?'}; daemon logged 'withholding "
               f"watchdog pings': {withheld}; systemd 'Watchdog timeout': {timeout_seen}; "
               f"NRestarts {before} -> {props['NRestarts']}; answering again: {ready}")
    lane.drop_in(None)
    lane.box.run("systemctl", "restart", lane.unit, timeout=600)


def check_no_restart(lane: Lane, code: int, drop_in: str, why: str) -> None:
    if code == 5:
        lane.box.run("sh", "-c", "rm -f /var/lib/edgerunner/preflight/*.json")
    lane.drop_in(drop_in)
    lane.box.run("systemctl", "reset-failed", lane.unit, check=False)
    lane.box.run("systemctl", "restart", lane.unit, check=False, timeout=600)
    time.sleep(12)  # RestartSec=5: a restart would have happened by now
    props = lane.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    lane.check(f"exit {code} is not restarted ({why})",
               props["ExecMainStatus"] == str(code) and props["NRestarts"] == "0"
               and props["ActiveState"] == "failed",
               f"ActiveState={props['ActiveState']} Result={props['Result']} "
               f"exit {props['ExecMainStatus']} NRestarts={props['NRestarts']}")
    lane.drop_in(None)
    lane.box.run("systemctl", "reset-failed", lane.unit, check=False)
    lane.box.run("systemctl", "start", lane.unit, timeout=600)


def check_updates(lane: Lane) -> None:
    active = lambda: lane.box.run("edgerunner", "install", "--status", "--json").stdout  # noqa: E731
    rc, data, err = lane.install("/srv/bundles/v2.tar")
    lane.facts["states: install v2 (good)"] = sequence(data)
    lane.check("install a good update: committed", rc == 0 and sequence(data)[-1:] ==
               ["committed"], f"exit {rc}: {' > '.join(sequence(data)) or err[-300:]}")
    good = json.loads(active())["active"]
    rc, data, err = lane.install("/srv/bundles/broken.tar")
    status = json.loads(active())
    steps = [s["state"] for s in status["update"]["steps"]]
    lane.facts["states: install broken (smoke fails)"] = steps
    answer = lane.probe("ask")
    lane.check("install a bundle that fails its smoke prompt: rolled back, old one answers",
               rc == 1 and steps[-1] == "rolled-back" and status["active"] == good
               and bool(answer.get("text")),
               f"exit {rc}: {' > '.join(steps)}; {err[:700]}; "
               f"active {status['active']} (good {good}); answers: {answer.get('text')!r}")
    pid = lane.probe("health").get("pid")
    rc, data, err = lane.install("/srv/bundles/unsigned.tar")
    after = json.loads(active())
    lane.facts["states: install unsigned"] = "refused before staging (journal unchanged)"
    lane.check("install an unsigned bundle: refused before anything switches",
               rc == 1 and "is unsigned" in err and after["active"] == good
               and lane.probe("health").get("pid") == pid,
               f"exit {rc}: {err.splitlines()[0][:160] if err else ''}; active {after['active']}")


# ---------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm-only", action="store_true",
                        help="run only if the cached rootfs is there; else say so and exit 0")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    opts = parser.parse_args()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    why = ("needs root" if os.geteuid() != 0 else
           f"needs {', '.join(missing)} (apt-get install --no-install-recommends "
           "systemd-container debootstrap zstd)" if missing else "")
    print(f"systemd lane cache: {cache.root()}", flush=True)
    if opts.warm_only and (why or not cache.ready()):
        print(f"systemd lane skipped: {why or 'its cache is cold (run `make test-systemd` once)'}")
        return 0
    if why:
        print(f"systemd lane: {why}")
        return 1
    started = time.monotonic()
    timings: dict[str, float] = {}
    cold = not cache.ready()
    mark = time.monotonic()
    cache.build_tarball()
    timings["cache (debootstrap + wheelhouse)" if cold else "cache (warm)"] = (
        time.monotonic() - mark)
    work = Path(tempfile.mkdtemp(prefix="systemd-lane-"))
    lane = Lane(Container(work / "rootfs", work / "nspawn.log"))
    mosquitto = None
    try:
        mark = time.monotonic()
        rootfs = cache.restore(work / "rootfs")
        wheel = cache.edgerunner_wheel(work / "wheel")
        shutil.copy(wheel, rootfs / "tmp" / wheel.name)
        subprocess.run(["chroot", str(rootfs), f"{cache.VENV}/bin/pip", "install", "--quiet",
                        "--no-index", "--no-deps", "--disable-pip-version-check",
                        f"/tmp/{wheel.name}"], check=True)
        timings["rootfs + edgerunner wheel"] = time.monotonic() - mark
        mark = time.monotonic()
        made = bundles(work / "bundles", work / "keys")
        (rootfs / "srv/bundles").mkdir(parents=True)
        for label in ("v1", "v2", "broken", "unsigned"):
            shutil.copy(made[label], rootfs / "srv/bundles" / f"{label}.tar")
        (rootfs / KEYRING.lstrip("/")).mkdir(parents=True)
        shutil.copy(work / "keys/lane.key.pub", rootfs / KEYRING.lstrip("/") / "lane.pub")
        lib = rootfs / "usr/local/lib/edgerunner-lane"
        lib.mkdir(parents=True)
        shutil.copy(Path(__file__).with_name("probe.py"), lib / "probe.py")
        sigill = rootfs / "usr/local/bin/sigill-python"
        sigill.write_text(SIGILL_PYTHON)
        sigill.chmod(0o755)
        timings["pack bundles"] = time.monotonic() - mark
        lane.name = str(made["name"])
        lane.unit = f"edgerunner@{lane.name}.service"
        lane.sock = f"/run/edgerunner/{lane.name}/api.sock"
        mosquitto, port = broker(work)
        timings["boot"] = lane.box.boot()
        lane.box.run("useradd", "-m", ALICE)
        lane.box.run("useradd", "-m", BOB)
        mark = time.monotonic()
        check_install_and_start(lane)
        check_socket_access(lane)
        check_strict_writes(lane)
        check_memory_limit(lane)
        check_security(lane)
        check_drain(lane)
        check_mqtt_restart(lane, port)
        check_watchdog(lane)
        check_no_restart(lane, 3, "[Service]\nEnvironment=EDGERUNNER_MEMORY_RESERVE_MB=1000000\n",
                         "nothing fits: a reserve no device has")
        check_no_restart(lane, 5, "[Service]\nEnvironment=EDGERUNNER_PREFLIGHT_PYTHON="
                         "/usr/local/bin/sigill-python\n", "the decode preflight dies of SIGILL")
        check_updates(lane)
        timings["checks"] = time.monotonic() - mark
    except Exception as exc:  # a lane failure is reported, not a traceback
        lane.check("lane", False, f"{type(exc).__name__}: {exc}")
    finally:
        mark = time.monotonic()
        lane.box.stop()
        timings["shutdown"] = time.monotonic() - mark
        if mosquitto is not None:
            mosquitto.terminate()
            mosquitto.wait()
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    timings.update(lane.timings)
    timings["total"] = time.monotonic() - started
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"systemd-analyze security: {lane.facts.get('security', '?')}")
    for key, value in lane.facts.items():
        if key.startswith("states"):
            print(f"{key}: {' > '.join(value) if isinstance(value, list) else value}")
    failed = [c for c in lane.checks if not c["ok"]]
    if opts.json:
        Path(opts.json).write_text(json.dumps({
            "cold": cold, "timings": {k: round(v, 1) for k, v in timings.items()},
            "facts": lane.facts, "checks": lane.checks}, indent=1))
    print(f"systemd-lane: {len(lane.checks) - len(failed)} passed, {len(failed)} failed "
          f"({'cold' if cold else 'warm'}, {timings['total']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
