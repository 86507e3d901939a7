#!/usr/bin/env python3
"""Runs every benchmark scenario against Synapse and Hearth, alternately, on the same machine in the
same run, and writes BENCHMARKS.md with the table, the plots and the commands.

Normally started through benches/compare.sh, which builds the binaries and prepares the Python
environments first. Everything runs on 127.0.0.1; only processes started here are stopped, by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEARTH = ROOT / "target/release/hearth"
LOADGEN = ROOT / "benches/loadgen/target/release/loadgen"
SYNAPSE_RUN = ROOT / "benches/synapse/run.sh"
WORK = ROOT / "target/bench/compare"
RESULTS = ROOT / "benches/results"
PLOTS = ROOT / "benches/plots"

HEARTH_PORT = 18008
SYNAPSE_PORT = 18448
PG_DB = {"hearth": "hearth_bench", "synapse": "synapse_bench"}
# Longest a single loadgen run may take, setup included (a 2,000-member room on Synapse is slow).
RUN_TIMEOUT = 45 * 60


@dataclass
class Scenario:
    key: str
    title: str
    args: list[str]
    # Which servers run it: Synapse has no WebSocket transport.
    servers: tuple[str, ...] = ("synapse", "hearth")
    # Extra loadgen arguments for Hearth only (e.g. the WebSocket transport).
    hearth_args: list[str] = field(default_factory=list)


SCENARIOS = [
    Scenario("dm", "(a) 100 users in 50 DMs, 20 msg/s", ["--scenario", "dm", "--users", "100", "--rate", "20"]),
    Scenario(
        "rooms",
        "(b) 200 users in 10 rooms of 20, 50 msg/s",
        ["--scenario", "rooms", "--rooms", "10", "--room-size", "20", "--rate", "50"],
    ),
    Scenario(
        "closed",
        "(c) closed loop, 8 senders, one room of 10",
        ["--scenario", "closed", "--room-size", "10", "--senders", "8"],
    ),
    Scenario(
        "idle", "(d) 1,000 idle syncing users", ["--scenario", "idle", "--users", "1000", "--duration", "20"]
    ),
    Scenario(
        "bigroom",
        "(e) one room of 2,000 members, 2 msg/s",
        ["--scenario", "bigroom", "--room-size", "2000", "--rate", "2"],
    ),
    Scenario(
        "sockets",
        "(f) 10,000 idle WebSockets",
        ["--scenario", "sockets", "--users", "10000", "--duration", "20", "--transport", "ws"],
        servers=("hearth",),
    ),
    Scenario(
        "rooms-ws",
        "(b) over Hearth's WebSocket transport",
        ["--scenario", "rooms", "--rooms", "10", "--room-size", "20", "--rate", "50", "--transport", "ws"],
        servers=("hearth",),
    ),
    Scenario(
        "closed-ws",
        "(c) over Hearth's WebSocket transport (sends too)",
        ["--scenario", "closed", "--room-size", "10", "--senders", "8", "--transport", "ws", "--send-transport", "ws"],
        servers=("hearth",),
    ),
]
SWEEP_RATES = [10, 25, 50, 100, 200, 400, 800, 1600]


def log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    log("$ " + shlex.join(str(c) for c in cmd))
    return subprocess.run(cmd, check=True, **kwargs)


def wait_ready(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_matrix/client/versions", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port} within {timeout}s")


def recreate_pg_database(name: str) -> None:
    psql = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c"]
    subprocess.run(psql + [f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], check=True)
    subprocess.run(psql + [f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"], check=True)


class Server:
    """One fresh server (empty data directory and database) for one loadgen run."""

    def __init__(self, kind: str, backend: str):
        self.kind, self.backend = kind, backend
        self.port = HEARTH_PORT if kind == "hearth" else SYNAPSE_PORT
        self.dir = WORK / f"{kind}-{backend}"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None

    def start(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        if self.kind == "synapse":
            db = "sqlite" if self.backend == "sqlite" else f"postgres:{PG_DB['synapse']}"
            # Same SQLite durability as Hearth (WAL, synchronous=NORMAL: a commit survives a crash
            # of the process, not of the machine); see benches/synapse/README.md.
            env = dict(os.environ)
            if self.backend == "sqlite":
                env["SYNAPSE_SQLITE_SYNCHRONOUS"] = "NORMAL"
            run([str(SYNAPSE_RUN), "start", str(self.dir), str(self.port), db], env=env)
            self.pid = int((self.dir / "synapse.pid").read_text().strip())
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
        env.update(
            HEARTH_DATA_DIR=str(self.dir / "data"),
            HEARTH_LISTEN=f'["127.0.0.1:{self.port}"]',
            HEARTH_REGISTRATION__MODE="open",
            # As for Synapse (benches/synapse/README.md): a benchmark must not measure rate limiters,
            # and both servers log at warning level.
            HEARTH_RATE_LIMITS__ENABLED="false",
            HEARTH_LOGGING__LEVEL="warn",
        )
        if self.backend == "postgres":
            recreate_pg_database(PG_DB["hearth"])
            env["HEARTH_DATABASE__URL"] = f"postgres://postgres@127.0.0.1:5432/{PG_DB['hearth']}"
        out = open(self.dir / "hearth.log", "wb")
        self.proc = subprocess.Popen([str(HEARTH)], env=env, stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        try:
            wait_ready(self.port)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.kind == "synapse":
            subprocess.run([str(SYNAPSE_RUN), "stop", str(self.dir)], check=False)
        elif self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def loadgen(server: Server, label: str, args: list[str], out: Path) -> dict | None:
    cmd = [
        str(LOADGEN),
        "--server",
        f"http://127.0.0.1:{server.port}",
        "--server-pid",
        str(server.pid),
        "--label",
        label,
        "--out",
        str(out),
        *args,
    ]
    try:
        result = run(cmd, timeout=RUN_TIMEOUT, stdout=subprocess.PIPE, text=True)
        print(result.stdout.strip(), flush=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        log(f"loadgen failed: {err}")
        return None
    data = json.loads(out.read_text())
    data["command"] = shlex.join(["loadgen", *cmd[1:]]).replace(str(ROOT) + "/", "")
    out.write_text(json.dumps(data, indent=1))
    return data


def one_run(kind: str, backend: str, key: str, args: list[str]) -> dict | None:
    server = Server(kind, backend)
    out = RESULTS / backend / f"{key}-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
    except Exception as err:  # a server that cannot start is a result too
        log(f"{kind} on {backend} did not start: {err}")
        return None
    try:
        return loadgen(server, f"{kind}-{backend}", args, out)
    finally:
        server.stop()


def saturated(result: dict | None) -> bool:
    if result is None:
        return True
    offered = result.get("offered_rate") or 0
    return result["achieved_send_rate"] < 0.9 * offered or result["e2e_latency_ms"]["p99"] > 5000


def machine_facts() -> dict:
    def cmd(args: list[str]) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    venv = Path(os.environ.get("SYNAPSE_VENV", ROOT / "target/bench/synapse-venv"))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "hearth_commit": cmd(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "rustc": cmd(["rustc", "--version"]),
        "synapse": cmd([str(venv / "bin/python"), "-c", "import synapse; print(synapse.__version__)"]),
        "synapse_python": cmd([str(venv / "bin/python"), "--version"]),
        "postgres": cmd(["psql", "-h", "127.0.0.1", "-U", "postgres", "-At", "-c", "SHOW server_version"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--scenarios", default=",".join(s.key for s in SCENARIOS) + ",sweep")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per run")
    parser.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from benches/results")
    options = parser.parse_args()
    backends = options.backends.split(",")
    wanted = set(options.scenarios.split(","))

    if not options.report_only:
        facts = machine_facts()
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "machine.json").write_text(json.dumps(facts, indent=1))
        duration = ["--duration", str(options.duration)]
        for backend in backends:
            for scenario in SCENARIOS:
                if scenario.key not in wanted:
                    continue
                # Sockets are the same on either database: measured once.
                if scenario.key == "sockets" and backend != "sqlite":
                    continue
                for kind in scenario.servers:
                    args = scenario.args + ([] if "--duration" in scenario.args else duration)
                    one_run(kind, backend, scenario.key, args)
            if "sweep" in wanted:
                for kind in ("synapse", "hearth"):
                    for rate in SWEEP_RATES:
                        args = ["--scenario", "rooms", "--rooms", "10", "--room-size", "20", "--rate", str(rate)]
                        result = one_run(kind, backend, f"sweep-{rate}", args + ["--duration", "15"])
                        if saturated(result):
                            log(f"{kind} on {backend} saturated at {rate} msg/s; higher rates skipped")
                            break

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import report  # noqa: E402  (matplotlib is only needed from here on)

    report.write(RESULTS, PLOTS, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
