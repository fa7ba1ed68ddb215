#!/usr/bin/env python3
"""Side-by-side benchmark of corvid-broker and Debian's mosquitto on this machine.

Why: the issue asks for ratios against a well-known broker measured the same way, so this script
starts one broker at a time on 127.0.0.1, drives it with corvid-bench, alternates the order of the
brokers every round (so slow drift on a shared machine hits both), and prints the median of each
figure plus the corvid/mosquitto ratio. Standard library only.

Figures: QoS0 and QoS1 delivered msg/s (p2p pairs, unthrottled with a bounded window), the same
QoS1 run with durable sessions (corvid with persistence.data_dir) and its p99 at 2000 msg/s, an
offline backlog's disk per queued message and the restart time on it, fan-out
1->1000 deliveries/s, p99 latency at a fixed offered rate, broker CPU-seconds per million
deliveries (utime+stime from /proc/PID/stat around the run), and broker RSS per idle connection at
10k connections (VmRSS delta from /proc/PID/status / connections).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Issue #16's targets: RSS growth per idle MQTT 3.1.1 connection (mosquitto: ~740 B), without
# and with one subscription each.
IDLE_TARGET_BYTES = 1024
IDLE_TARGETS = {"idle": IDLE_TARGET_BYTES, "idle_sub": 1536}
# Connection storm: handshakes in flight at once, and the pause before "after" memory is read.
# One loopback generator on 2 cores: from about 200 in flight both brokers' handshakes start
# waiting on 1 s SYN retransmits (the generator and kernel, not the broker, set the pace), so
# the storm keeps 50 in flight.
STORM_CONCURRENCY = 50
STORM_SETTLE_S = 7.0
# Issue #16: at least this many new connections per second on the benchmark machine.
STORM_TARGET_PER_SEC = 10000


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker did not listen on 127.0.0.1:{port} within {timeout}s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Broker:
    """One broker process on loopback; subclasses say how to start it."""

    name = "broker"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        self.port = free_port()
        cmd = self.command()
        logf = open(self.workdir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env()
        )
        logf.close()
        wait_port(self.port, self.proc)
        time.sleep(0.3)  # let it finish start-up allocations before baselines are read

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def state_dir(self) -> Path | None:
        """Where the broker keeps state on disk for this run, if anywhere."""
        return None

    def ready(self) -> bool:
        """Whether the broker serves clients (after restoring what it stored)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def restart_timed(self, timeout: float = 120.0) -> float:
        """Starts the broker again on the same state and returns the seconds until it is ready."""
        self.port = free_port()
        cmd = self.command()
        logf = open(self.workdir / f"{self.name}.log", "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env()
        )
        logf.close()
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while restoring")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{self.name} not ready within {timeout}s of a restart")
            time.sleep(0.01)
        return time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL: nothing is written on the way down."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Mosquitto(Broker):
    name = "mosquitto"

    def __init__(self, workdir: Path, binary: str):
        super().__init__(workdir)
        self.binary = binary
        # Set per run by the backlog scenario: persistence on, its file in this directory.
        self.persist_dir: Path | None = None

    def state_dir(self) -> Path | None:
        return self.persist_dir

    def command(self) -> list[str]:
        conf = self.workdir / "mosquitto.conf"
        persistence = ["persistence false"]
        if self.persist_dir is not None:
            self.persist_dir.mkdir(parents=True, exist_ok=True)
            # Mosquitto writes its whole state at exit (and on autosave, off here).
            persistence = ["persistence true", f"persistence_location {self.persist_dir}/", "autosave_interval 0"]
            if os.geteuid() == 0:
                # Started as root, mosquitto drops to user mosquitto, which may not write here.
                persistence.append("user root")
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous true",
                    *persistence,
                    # Never drop on queue limits: we measure speed, not load shedding.
                    "max_queued_messages 10000000",
                    "max_queued_bytes 0",
                    "max_inflight_messages 0",
                    # Mosquitto leaves Nagle on by default; turn it off as corvid does.
                    "set_tcp_nodelay true",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "max_connections -1",
                    "",
                ]
            )
        )
        return [self.binary, "-c", str(conf)]


class Corvid(Broker):
    name = "corvid"

    def __init__(self, workdir: Path, binary: str):
        super().__init__(workdir)
        self.binary = binary
        # Set per run by scenarios that measure durable sessions (persistence.data_dir).
        self.data_dir: Path | None = None
        try:
            help_text = subprocess.run(
                [binary, "serve", "--help"], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            help_text = ""
        self.has_cluster_port = "--cluster-port" in help_text

    def command(self) -> list[str]:
        self.ws_port, self.admin_port = free_port(), free_port()
        cmd = [
            self.binary,
            "serve",
            "--mqtt-port",
            str(self.port),
            "--ws-port",
            str(self.ws_port),
            "--admin-port",
            str(self.admin_port),
        ]
        if self.has_cluster_port:
            cmd += ["--cluster-port", str(free_port())]
        return cmd

    def state_dir(self) -> Path | None:
        return self.data_dir

    def ready(self) -> bool:
        # Listening is not enough: /readyz answers 200 once the store is restored.
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=0.5) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def env(self) -> dict[str, str]:
        # Same footing as the mosquitto config: loopback only, warnings and errors logged.
        return {
            **os.environ,
            "CORVID_LISTENERS__MQTT__BIND": f"127.0.0.1:{self.port}",
            "CORVID_LISTENERS__WS__BIND": f"127.0.0.1:{self.ws_port}",
            "CORVID_ADMIN__BIND": f"127.0.0.1:{self.admin_port}",
            "CORVID_LOG__LEVEL": "warn",
            # The counterpart of mosquitto's max_queued_messages above: the default (1000 per
            # session, drop oldest) sheds load by design, and we measure speed, not shedding.
            "CORVID_SESSIONS__MAX_OFFLINE_QUEUE": "10000000",
            # Every benchmark client comes from 127.0.0.1 (10k idle connections, fan-out to 1000):
            # the per-address cap, meant for the internet, would refuse them.
            "CORVID_LIMITS__MAX_CONNECTIONS_PER_IP": "0",
            **({"CORVID_PERSISTENCE__DATA_DIR": str(self.data_dir)} if self.data_dir else {}),
        }


def run_bench(bench: str, args: list[str], timeout: float) -> dict:
    cmd = [bench, *args, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def scenarios(quick: bool) -> list[dict]:
    dur, warm = ("3", "1") if quick else ("8", "2")
    pairs = "10"
    fan = "200" if quick else "1000"
    conns = 2000 if quick else 10000
    backlog_sessions, backlog_msgs = (100, 100_000) if quick else (1000, 1_000_000)
    common = ["--duration", dur, "--warmup", warm, "--drain", "5"]
    return [
        {
            "key": "qos0",
            "title": "QoS0 delivered msg/s (p2p 10 pairs, 64 B, unthrottled)",
            "args": ["pub-sub", "--scenario", "p2p", "--publishers", pairs, "--qos", "0", "--rate", "0", *common],
        },
        {
            "key": "qos1",
            "title": "QoS1 delivered msg/s (p2p 10 pairs, 64 B, unthrottled)",
            "args": ["pub-sub", "--scenario", "p2p", "--publishers", pairs, "--qos", "1", "--rate", "0", *common],
        },
        {
            # Clients that wait for each PUBACK (mqtt-benchmark, many device SDKs): nothing to batch.
            "key": "qos1sw",
            "title": "QoS1 delivered msg/s, 1 in flight per publisher (p2p 10 pairs)",
            "args": [
                "pub-sub", "--scenario", "p2p", "--publishers", pairs, "--qos", "1", "--rate", "0",
                "--inflight", "1", *common,
            ],
        },
        {
            "key": "fanout",
            "title": f"fan-out 1->{fan} deliveries/s (QoS0, 64 B)",
            "args": [
                "pub-sub", "--scenario", "fan-out", "--publishers", "1", "--subscribers", fan,
                "--qos", "0", "--rate", "0", "--window", "100", *common,
            ],
        },
        {
            "key": "latency",
            "title": "p99 latency at 2000 msg/s (p2p 10 pairs, QoS1)",
            "args": ["pub-sub", "--scenario", "p2p", "--publishers", pairs, "--qos", "1", "--rate", "2000", *common],
        },
        {
            # Durable sessions (#15): subscribers keep their sessions and corvid runs with
            # persistence.data_dir, so every delivery is on disk before its PUBACK goes out.
            # mosquitto runs as everywhere else (persistence false: it writes only on autosave).
            "key": "qos1_durable",
            "title": "QoS1 delivered msg/s, durable sessions (corvid: data_dir, sync always; p2p 10 pairs)",
            "args": [
                "pub-sub", "--scenario", "p2p", "--publishers", pairs, "--qos", "1", "--rate", "0",
                "--persistent-subscribers", *common,
            ],
            "durable": True,
        },
        {
            "key": "latency_durable",
            "title": "p99 latency at 2000 msg/s, durable sessions (p2p 10 pairs, QoS1)",
            "args": [
                "pub-sub", "--scenario", "p2p", "--publishers", pairs, "--qos", "1", "--rate", "2000",
                "--persistent-subscribers", *common,
            ],
            "durable": True,
        },
        {
            # An offline backlog (#15 item 6): persistent sessions away, a QoS 1 backlog queued
            # for them; disk per queued message, then a restart on that state timed until the
            # broker serves again, and every message checked. Corvid is killed (-9: what it
            # acknowledged is on disk); mosquitto, whose persistence writes only on autosave
            # and at exit, is stopped with SIGTERM so it has a file to restart from.
            "key": "backlog",
            "title": f"offline backlog: disk per queued message ({backlog_msgs:,} × 64 B for {backlog_sessions:,} sessions)",
            "sessions": backlog_sessions,
            "messages": backlog_msgs,
            "durable": True,
        },
        {"key": "idle", "title": f"RSS per idle connection ({conns} connections)", "connections": conns},
        {
            # Every device reconnecting at once after a pod restart: as fast as the generator
            # can open them, STORM_CONCURRENCY handshakes in flight.
            "key": "storm",
            "title": f"connection storm: connects/s ({conns} at once, {STORM_CONCURRENCY} in flight)",
            "connections": conns,
        },
        {
            "key": "idle_sub",
            "title": f"RSS per idle connection with one subscription ({conns} connections)",
            "connections": conns,
            "subscribe": True,
        },
    ]


def measure_pubsub(broker: Broker, bench: str, sc: dict) -> dict:
    cpu0 = cpu_seconds(broker.pid)
    t0 = time.monotonic()
    rep = run_bench(bench, [*sc["args"][:1], "--port", str(broker.port), *sc["args"][1:]], timeout=300)
    wall = time.monotonic() - t0
    cpu = cpu_seconds(broker.pid) - cpu0
    delivered = rep["delivered"]
    return {
        "delivered_per_sec": rep["delivered_per_sec"],
        "p99_us": rep["latency"]["p99_us"],
        "p50_us": rep["latency"]["p50_us"],
        "p99_from_send_us": rep["latency_from_send"]["p99_us"],
        "cpu_s": cpu,
        "cpu_s_per_million": cpu / delivered * 1e6 if delivered else None,
        "broker_cpu_util": cpu / wall if wall else None,
        "lost": rep["lost"],
        "duplicates": rep["duplicates"],
        "connect_errors": rep["connect_errors"],
        "run_errors": rep["run_errors"],
        "report": rep,
    }


def measure_idle(broker: Broker, bench: str, sc: dict, workdir: Path, hold: float) -> dict:
    ready = workdir / "idle.ready"
    ready.unlink(missing_ok=True)
    base = rss_bytes(broker.pid)
    cmd = [
        bench, "conn", "--port", str(broker.port), "--connections", str(sc["connections"]),
        "--rate", "5000", "--hold", str(hold), "--ready-file", str(ready), "--json",
        *(["--subscribe"] if sc.get("subscribe") else []),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"conn run ended before all connections were up: {err.strip()[-2000:]}")
        time.sleep(0.1)
    ready_at = time.monotonic()
    time.sleep(min(2.0, hold / 3))  # let the broker finish per-connection allocations
    held = rss_bytes(broker.pid)
    # Again just before the clients let go: the figure must still hold (issue #16: "and
    # still holding after 60 s"); the larger of the two readings is the one reported.
    time.sleep(max(0.0, ready_at + hold - 1.0 - time.monotonic()))
    held_late = rss_bytes(broker.pid)
    out, err = proc.communicate(timeout=hold + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"conn run failed: {err.strip()[-2000:]}")
    rep = json.loads(out.strip().splitlines()[-1])
    n = rep["established"]
    return {
        "rss_base_bytes": base,
        "rss_held_bytes": held,
        "rss_held_late_bytes": held_late,
        "established": n,
        "connect_errors": rep["connect_errors"],
        "bytes_per_conn": (max(held, held_late) - base) / n if n else None,
        "report": rep,
    }


def measure_storm(broker: Broker, bench: str, sc: dict, workdir: Path) -> dict:
    """A reconnect storm: connect rate, CONNECT→CONNACK p99, and what the broker still holds
    once every client of the storm has gone again (memory after the storm settles)."""
    ready = workdir / "storm.ready"
    ready.unlink(missing_ok=True)
    base = rss_bytes(broker.pid)
    cmd = [
        bench, "conn", "--port", str(broker.port), "--connections", str(sc["connections"]),
        "--rate", "0", "--connect-concurrency", str(STORM_CONCURRENCY), "--hold", "3",
        "--ready-file", str(ready), "--json",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"storm ended before all connections were up: {err.strip()[-2000:]}")
        time.sleep(0.05)
    held = rss_bytes(broker.pid)
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"storm run failed: {err.strip()[-2000:]}")
    rep = json.loads(out.strip().splitlines()[-1])
    time.sleep(STORM_SETTLE_S)  # the broker ends the sessions and frees what they held
    after = rss_bytes(broker.pid)
    n = rep["established"]
    return {
        "connects_per_sec": rep["connects_per_sec"],
        "handshake_p99_us": rep["handshake"]["p99_us"],
        "established": n,
        "connect_errors": rep["connect_errors"],
        "bytes_per_conn_held": (held - base) / n if n else None,
        "rss_settled_growth_bytes": after - base,
        "report": rep,
    }


def allocated_bytes(path: Path | None) -> int | None:
    """Disk blocks the files under `path` occupy (what the volume is charged), in bytes."""
    if path is None or not path.exists():
        return None
    total = 0
    for f in path.rglob("*"):
        if f.is_file():
            total += f.stat().st_blocks * 512
    return total


def measure_backlog(broker: Broker, bench: str, sc: dict) -> dict:
    common = ["--sessions", str(sc["sessions"]), "--messages", str(sc["messages"]),
              "--prefix", f"backlog-{time.time_ns() % 10**9}"]
    fill = run_bench(bench, ["backlog", "--port", str(broker.port), "--phase", "fill", *common], timeout=900)
    if isinstance(broker, Corvid):
        broker.kill()
    else:
        broker.stop()
    disk = allocated_bytes(broker.state_dir())
    recovery = broker.restart_timed()
    check = run_bench(bench, ["backlog", "--port", str(broker.port), "--phase", "check", *common], timeout=900)
    return {
        "acknowledged": fill["acknowledged"],
        "fill_msgs_per_sec": fill["acknowledged"] / fill["publish_secs"] if fill["publish_secs"] else None,
        "disk_bytes": disk,
        "disk_bytes_per_msg": disk / fill["acknowledged"] if disk is not None and fill["acknowledged"] else None,
        "recovery_s": recovery,
        "sessions_present": check["sessions_present"],
        "received": check["received"],
        "lost": check["lost"],
    }


def median(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}{unit}"
    return f"{v:.2f}{unit}"


def ensure_mosquitto() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("mosquitto is not installed and we are not root: apt-get install mosquitto")
    log("installing mosquitto with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "mosquitto"], check=True, env=env)
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(found).exists():
        raise SystemExit("mosquitto still missing after apt-get install")
    # Debian's package enables a system service; make sure it is not holding port 1883 for us.
    subprocess.run(["systemctl", "stop", "mosquitto"], capture_output=True)
    return found


def build(target_dir: Path, package: str) -> bool:
    log(f"cargo build --release -p {package}")
    env = {**os.environ, "CARGO_TARGET_DIR": str(target_dir)}
    res = subprocess.run(["cargo", "build", "--release", "-p", package], cwd=REPO, env=env)
    return res.returncode == 0


TARGETS = {
    # key: (metric, better, target ratio or absolute, description)
    "qos0": ("delivered_per_sec", "higher", 1.5),
    "qos1": ("delivered_per_sec", "higher", 1.5),
    "fanout": ("delivered_per_sec", "higher", 1.0),
    "latency": ("p99_us", "lower", None),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs, 1 round, smaller fan-out and idle counts")
    ap.add_argument("--rounds", type=int, help="rounds per scenario (default 3, quick 1)")
    ap.add_argument("--brokers", default="corvid,mosquitto", help="comma list of corvid,mosquitto")
    ap.add_argument("--only", help="comma list of scenarios: qos0,qos1,qos1sw,fanout,latency,qos1_durable,latency_durable,backlog,idle,idle_sub,storm")
    ap.add_argument("--skip-build", action="store_true", help="use already built release binaries")
    ap.add_argument("--out", default=str(REPO / "target" / "bench" / "report.json"))
    args = ap.parse_args()

    rounds = args.rounds or (1 if args.quick else 3)
    target_dir = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    wanted = [b.strip() for b in args.brokers.split(",") if b.strip()]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    if not args.skip_build and not build(target_dir, "corvid-bench"):
        raise SystemExit("corvid-bench did not build")
    bench = str(target_dir / "release" / "corvid-bench")

    # Broker configs and logs of the last run stay here for a look after a failure.
    workdir = Path(args.out).parent / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    brokers: list[Broker] = []
    notes: list[str] = []
    if "corvid" in wanted:
        corvid_bin = target_dir / "release" / "corvid-broker"
        ok = args.skip_build or build(target_dir, "corvid-broker")
        usable = ok and corvid_bin.exists() and subprocess.run(
            [str(corvid_bin), "serve", "--help"], capture_output=True
        ).returncode == 0
        if usable:
            brokers.append(Corvid(workdir, str(corvid_bin)))
        else:
            notes.append("corvid-broker unavailable (did not build or has no `serve`); ratios omitted")
            log(notes[-1])
    if "mosquitto" in wanted:
        brokers.append(Mosquitto(workdir, ensure_mosquitto()))
    if not brokers:
        raise SystemExit("no broker to benchmark")

    scs = scenarios(args.quick)
    if args.only:
        keep = {k.strip() for k in args.only.split(",")}
        scs = [s for s in scs if s["key"] in keep]
    hold = 6.0 if args.quick else 60.0
    runs: list[dict] = []
    for sc in scs:
        for r in range(rounds):
            order = brokers if r % 2 == 0 else list(reversed(brokers))
            for b in order:
                log(f"{sc['key']} round {r + 1}/{rounds} on {b.name}")
                if isinstance(b, Corvid):
                    b.data_dir = workdir / f"data-{sc['key']}-{r + 1}" if sc.get("durable") else None
                if isinstance(b, Mosquitto):
                    b.persist_dir = workdir / f"mosq-{sc['key']}-{r + 1}" if sc["key"] == "backlog" else None
                b.start()
                try:
                    if sc["key"] in IDLE_TARGETS:
                        m = measure_idle(b, bench, sc, workdir, hold)
                    elif sc["key"] == "storm":
                        m = measure_storm(b, bench, sc, workdir)
                    elif sc["key"] == "backlog":
                        m = measure_backlog(b, bench, sc)
                    else:
                        m = measure_pubsub(b, bench, sc)
                    m.update({"scenario": sc["key"], "broker": b.name, "round": r + 1})
                    runs.append(m)
                    short = {k: v for k, v in m.items() if k != "report"}
                    log(f"  -> {json.dumps(short)}")
                except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                    log(f"  !! {b.name} {sc['key']} failed: {e}")
                    runs.append({"scenario": sc["key"], "broker": b.name, "round": r + 1, "error": str(e)})
                finally:
                    b.stop()
                time.sleep(0.5)

    # Medians per broker and metric.
    def med(key: str, broker: str, metric: str):
        return median([x.get(metric) for x in runs if x["scenario"] == key and x["broker"] == broker])

    names = [b.name for b in brokers]
    rows = []

    def add(label, key, metric, better, target, unit=""):
        vals = {n: med(key, n, metric) for n in names}
        c, m = vals.get("corvid"), vals.get("mosquitto")
        ratio = c / m if (c is not None and m) else None
        ok = None
        if ratio is not None and target is not None:
            ok = ratio >= target if better == "higher" else ratio <= target
        rows.append({"figure": label, "scenario": key, "metric": metric, "better": better, "target_ratio": target,
                     "corvid": c, "mosquitto": m, "ratio": ratio, "meets_target": ok, "unit": unit})

    titles = {s["key"]: s["title"] for s in scenarios(args.quick)}
    keys = {s["key"] for s in scs}
    if "qos0" in keys:
        add(titles["qos0"], "qos0", "delivered_per_sec", "higher", 1.5, " msg/s")
    if "qos1" in keys:
        add(titles["qos1"], "qos1", "delivered_per_sec", "higher", 1.5, " msg/s")
    if "qos1_durable" in keys:
        add(titles["qos1_durable"], "qos1_durable", "delivered_per_sec", "higher", 1.0, " msg/s")
        c_mem, c_dur = med("qos1", "corvid", "delivered_per_sec"), med("qos1_durable", "corvid", "delivered_per_sec")
        if c_mem and c_dur is not None:
            # corvid against itself: the cost of durability (#15 item 6: at least half).
            rows.append({"figure": f"  corvid durable ÷ corvid in memory ({c_mem:,.0f} msg/s, QoS1 row)",
                         "scenario": "qos1_durable", "metric": "durable_ratio", "better": "higher",
                         "target_ratio": 0.5, "corvid": c_dur, "mosquitto": None, "ratio": c_dur / c_mem,
                         "meets_target": c_dur / c_mem >= 0.5, "unit": " msg/s"})
    if "latency_durable" in keys:
        add(titles["latency_durable"], "latency_durable", "p99_us", "lower", None, " µs")
    if "backlog" in keys:
        add(titles["backlog"], "backlog", "disk_bytes_per_msg", "lower", None, " B")
        add("  restart on that backlog until serving (corvid: kill -9, /readyz; mosquitto: SIGTERM, port)",
            "backlog", "recovery_s", "lower", None, " s")
    if "qos1sw" in keys:
        add(titles["qos1sw"], "qos1sw", "delivered_per_sec", "higher", None, " msg/s")
    if "fanout" in keys:
        add(titles["fanout"], "fanout", "delivered_per_sec", "higher", 1.0, " /s")
    if "latency" in keys:
        add(titles["latency"], "latency", "p99_us", "lower", None, " µs")
        add("  same run: p99 from actual send", "latency", "p99_from_send_us", "lower", None, " µs")
        add("CPU-s per million deliveries (at 2000 msg/s, QoS1)", "latency", "cpu_s_per_million", "lower", 1.0, " s")
    if "qos0" in keys:
        add("CPU-s per million deliveries (QoS0 unthrottled)", "qos0", "cpu_s_per_million", "lower", 1.0, " s")
    for key in IDLE_TARGETS:
        if key in keys:
            add(titles[key], key, "bytes_per_conn", "lower", None, " B")

    if "storm" in keys:
        add(titles["storm"], "storm", "connects_per_sec", "higher", None, " /s")
        add("  same storm: p99 TCP connect + CONNECT→CONNACK", "storm", "handshake_p99_us", "lower", None, " µs")
        add("  same storm: RSS growth after every client left again", "storm", "rss_settled_growth_bytes",
            "lower", None, " B")

    correctness = {
        n: {
            "lost": sum(x.get("lost", 0) or 0 for x in runs if x["broker"] == n),
            "duplicates": sum(x.get("duplicates", 0) or 0 for x in runs if x["broker"] == n),
            "connect_errors": sum(x.get("connect_errors", 0) or 0 for x in runs if x["broker"] == n),
            "failed_runs": sum(1 for x in runs if x["broker"] == n and "error" in x),
        }
        for n in names
    }
    idle_corvid = {k: med(k, "corvid", "bytes_per_conn") for k in IDLE_TARGETS}
    report = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "rounds": rounds,
        "brokers": names,
        "notes": notes,
        "host": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "summary": rows,
        "corvid_idle_conn_target_bytes": IDLE_TARGET_BYTES,
        "corvid_idle_conn_meets_target": (
            idle_corvid["idle"] <= IDLE_TARGET_BYTES if idle_corvid["idle"] is not None else None
        ),
        "corvid_idle_sub_conn_target_bytes": IDLE_TARGETS["idle_sub"],
        "corvid_idle_sub_conn_meets_target": (
            idle_corvid["idle_sub"] <= IDLE_TARGETS["idle_sub"] if idle_corvid["idle_sub"] is not None else None
        ),
        "correctness": correctness,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    log(f"wrote {out}")

    print(f"| figure | corvid | mosquitto | corvid/mosquitto | target |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        if row["target_ratio"] is None and row["metric"] == "connects_per_sec":
            tgt = f"≥ {STORM_TARGET_PER_SEC:,} /s (corvid)"
            if row["corvid"] is not None:
                tgt += " ✅" if row["corvid"] >= STORM_TARGET_PER_SEC else " ❌"
        elif row["target_ratio"] is None and row["scenario"] in ("storm", "backlog"):
            tgt = "—"
        elif row["target_ratio"] is None:
            target = IDLE_TARGETS.get(row["scenario"])
            tgt = f"≤ {target:,} B (corvid)" if target else "—"
        else:
            tgt = ("≥ " if row["better"] == "higher" else "≤ ") + f"{row['target_ratio']}×"
        if row["meets_target"] is not None:
            tgt += " ✅" if row["meets_target"] else " ❌"
        elif idle_corvid.get(row["scenario"]) is not None:
            tgt += " ✅" if idle_corvid[row["scenario"]] <= IDLE_TARGETS[row["scenario"]] else " ❌"
        ratio = f"{row['ratio']:.2f}×" if row["ratio"] is not None else "n/a"
        print(f"| {row['figure']} | {fmt(row['corvid'], row['unit'])} | {fmt(row['mosquitto'], row['unit'])} | {ratio} | {tgt} |")
    print()
    print(f"rounds per figure: {rounds} (median shown); correctness: {json.dumps(correctness)}")
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
