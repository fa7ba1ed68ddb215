#!/usr/bin/env python3
"""Three corvid-broker nodes against one: what crossing the cluster costs.

Why: in a cluster a publisher and its subscribers are usually on different nodes, so every
message takes one extra hop over an inter-node link. The issue's bar: with the publishers on
node A and the subscribers on node B, delivered throughput must be at least 75% of what one node
does with everybody connected to it, and the p99 latency of that forwarded path is reported.

How: for each round, start a fresh single node and drive it with corvid-bench (publishers and
subscribers on it), then start a fresh three-node cluster (static discovery on 127.0.0.1, shared
secret), wait until every node is ready and linked to the two others, and drive it with the
publishers on A and the subscribers on B (`--sub-port`). The order alternates every round so slow
drift on a shared machine hits both; medians are printed. Broker CPU is summed over every node
of the setup. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# Shared with the single-node comparison (same directory; its main() only runs as a script).
from compare import cpu_seconds, fmt, median, run_bench

REPO = Path(__file__).resolve().parent.parent
SECRET = "corvid-bench-cluster-secret-0123456789"


def log(msg: str) -> None:
    print(f"[cluster-bench] {msg}", file=sys.stderr, flush=True)


_TAKEN: set[int] = set()


def free_port() -> int:
    """A port free for TCP and UDP on 127.0.0.1 (the cluster port needs both), never repeated."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port
    raise RuntimeError("no free port in 200 tries")


def http_json(port: int, path: str) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            body = r.read()
            return r.status, (json.loads(body) if body.strip().startswith(b"{") else None)
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError):
        return 0, None


class Node:
    """One corvid-broker process on loopback, alone or in a static cluster."""

    def __init__(self, binary: str, workdir: Path, name: str, mqtt: int, admin: int, cport: int,
                 peers: list[int] | None):
        self.name, self.mqtt, self.admin = name, mqtt, admin
        cmd = [binary, "serve", "--node-name", name, "--mqtt-port", str(mqtt), "--admin-port", str(admin),
               "--cluster-port", str(cport)]
        env = {
            **os.environ,
            # The same footing as bench/compare.py: loopback only, warnings logged, no load shedding.
            "CORVID_LISTENERS__MQTT__BIND": f"127.0.0.1:{mqtt}",
            "CORVID_LISTENERS__WS__ENABLED": "false",
            "CORVID_ADMIN__BIND": f"127.0.0.1:{admin}",
            "CORVID_LOG__LEVEL": "warn",
            "CORVID_SESSIONS__MAX_OFFLINE_QUEUE": "10000000",
            # Every benchmark client comes from 127.0.0.1 (10k idle connections, fan-out to 1000):
            # the per-address cap, meant for the internet, would refuse them.
            "CORVID_LIMITS__MAX_CONNECTIONS_PER_IP": "0",
            "CORVID_SYS__ENABLED": "false",
            "CORVID_CLUSTER__BIND": "127.0.0.1",
            "CORVID_CLUSTER__ADVERTISE": "127.0.0.1",
        }
        env.pop("RUST_LOG", None)
        if peers:
            secret = workdir / "secret"
            cmd += ["--discovery", "static", "--peers", ",".join(f"127.0.0.1:{p}" for p in peers),
                    "--cluster-secret-file", str(secret)]
        self.log = workdir / f"{name}.log"
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        logf.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class Setup:
    """One node, or three in a cluster; `pub_port`/`sub_port` say where the clients go."""

    def __init__(self, binary: str, workdir: Path, nodes: int):
        self.nodes: list[Node] = []
        ports = [(free_port(), free_port(), free_port()) for _ in range(nodes)]
        peers = [c for _, _, c in ports] if nodes > 1 else None
        (workdir / "secret").write_text(SECRET)
        for i, (m, a, c) in enumerate(ports):
            self.nodes.append(Node(binary, workdir, f"n{i + 1}", m, a, c, peers))
        self.pub_port = self.nodes[0].mqtt
        self.sub_port = self.nodes[-1 if nodes == 1 else 1].mqtt

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        names = {n.name for n in self.nodes}
        for n in self.nodes:
            while True:
                if n.proc.poll() is not None:
                    tail = n.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{n.name} exited with {n.proc.returncode}:\n{tail}")
                status, _ = http_json(n.admin, "/readyz")
                ok = status == 200
                if ok and len(self.nodes) > 1:
                    _, view = http_json(n.admin, "/api/v1/cluster")
                    members = (view or {}).get("members", [])
                    ready = {m["name"] for m in members if m.get("state") == "ready" and m.get("linked")}
                    ok = ready >= names - {n.name}
                if ok:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{n.name} not ready and linked within {timeout}s")
                time.sleep(0.1)

    def cpu(self) -> float:
        return sum(cpu_seconds(n.proc.pid) for n in self.nodes)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def scenarios(quick: bool) -> list[dict]:
    dur, warm = ("3", "1") if quick else ("8", "2")
    common = ["--scenario", "p2p", "--publishers", "10", "--duration", dur, "--warmup", warm, "--drain", "5"]
    return [
        {"key": "qos0", "title": "QoS0 delivered msg/s (p2p 10 pairs, 64 B, unthrottled)",
         "args": [*common, "--qos", "0", "--rate", "0"]},
        {"key": "qos1", "title": "QoS1 delivered msg/s (p2p 10 pairs, 64 B, unthrottled)",
         "args": [*common, "--qos", "1", "--rate", "0"]},
        {"key": "latency", "title": "latency at 2000 msg/s (p2p 10 pairs, QoS1)",
         "args": [*common, "--qos", "1", "--rate", "2000"]},
    ]


def measure(setup: Setup, bench: str, sc: dict) -> dict:
    cpu0, t0 = setup.cpu(), time.monotonic()
    args = ["pub-sub", "--port", str(setup.pub_port)]
    if setup.sub_port != setup.pub_port:
        args += ["--sub-port", str(setup.sub_port)]
    rep = run_bench(bench, [*args, *sc["args"]], timeout=300)
    cpu, wall = setup.cpu() - cpu0, time.monotonic() - t0
    return {
        "delivered_per_sec": rep["delivered_per_sec"],
        "p50_us": rep["latency"]["p50_us"],
        "p99_us": rep["latency"]["p99_us"],
        "p99_from_send_us": rep["latency_from_send"]["p99_us"],
        "cpu_s_per_million": cpu / rep["delivered"] * 1e6 if rep["delivered"] else None,
        "broker_cpu_util": cpu / wall if wall else None,
        "lost": rep["lost"],
        "duplicates": rep["duplicates"],
        "report": rep,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s instead of 3 rounds of 8 s")
    ap.add_argument("--rounds", type=int, help="rounds per figure (default 3, --quick 1)")
    ap.add_argument("--skip-build", action="store_true", help="use already built release binaries")
    ap.add_argument("--out", default=str(REPO / "target" / "bench" / "cluster.json"))
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    target_dir = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not args.skip_build:
        log("cargo build --release -p corvid-broker -p corvid-bench")
        env = {**os.environ, "CARGO_TARGET_DIR": str(target_dir)}
        if subprocess.run(["cargo", "build", "--release", "-p", "corvid-broker", "-p", "corvid-bench"],
                          cwd=REPO, env=env).returncode != 0:
            return 1
    broker = str(target_dir / "release" / "corvid-broker")
    bench = str(target_dir / "release" / "corvid-bench")

    results: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory(prefix="corvid-cluster-bench-") as tmp:
        for sc in scenarios(args.quick):
            per = results.setdefault(sc["key"], {"1 node": [], "3 nodes": []})
            for r in range(rounds):
                order = [1, 3] if r % 2 == 0 else [3, 1]
                for nodes in order:
                    label = "1 node" if nodes == 1 else "3 nodes"
                    workdir = Path(tmp) / f"{sc['key']}-{r}-{nodes}"
                    workdir.mkdir()
                    setup = Setup(broker, workdir, nodes)
                    try:
                        setup.wait_ready()
                        m = measure(setup, bench, sc)
                    finally:
                        setup.stop()
                    log(f"{sc['key']} round {r + 1}/{rounds} {label}: {fmt(m['delivered_per_sec'])} msg/s, "
                        f"p99 {fmt(m['p99_us'])} us, lost {m['lost']}, dup {m['duplicates']}")
                    per[label].append(m)

    load = os.getloadavg()
    summary = []
    print(f"\n{rounds} round(s) per figure, medians; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          f"on {os.cpu_count()} CPUs\n")
    print("| figure | 1 node | 3 nodes (pub on A, sub on B) | 3 nodes / 1 node | target |")
    print("|---|---:|---:|---:|---|")
    for sc in scenarios(args.quick):
        per = results[sc["key"]]
        one = {k: median([m[k] for m in per["1 node"]]) for k in per["1 node"][0] if k != "report"}
        three = {k: median([m[k] for m in per["3 nodes"]]) for k in per["3 nodes"][0] if k != "report"}
        if sc["key"] == "latency":
            rows = [("p50 latency from scheduled send", "p50_us", " µs"), ("p99 latency from scheduled send", "p99_us", " µs"),
                    ("p99 latency from actual send", "p99_from_send_us", " µs")]
            for title, k, unit in rows:
                ratio = three[k] / one[k] if one[k] else None
                print(f"| {title}, {sc['title']} | {fmt(one[k], unit)} | {fmt(three[k], unit)} | "
                      f"{fmt(ratio, '×')} | reported |")
                summary.append({"figure": f"{title}, {sc['title']}", "one": one[k], "three": three[k], "ratio": ratio})
        else:
            k = "delivered_per_sec"
            ratio = three[k] / one[k] if one[k] else None
            ok = ratio is not None and ratio >= 0.75
            print(f"| {sc['title']} | {fmt(one[k], ' msg/s')} | {fmt(three[k], ' msg/s')} | {fmt(ratio, '×')} | "
                  f"≥ 0.75× {'✅' if ok else '❌'} |")
            summary.append({"figure": sc["title"], "one": one[k], "three": three[k], "ratio": ratio, "meets_target": ok})
        c1, c3 = one["cpu_s_per_million"], three["cpu_s_per_million"]
        print(f"| broker CPU-s per million deliveries, {sc['key']} (all nodes) | {fmt(c1, ' s')} | {fmt(c3, ' s')} | "
              f"{fmt(c3 / c1 if c1 and c3 else None, '×')} | — |")
        lost = sum(m["lost"] for v in per.values() for m in v)
        dups = sum(m["duplicates"] for v in per.values() for m in v)
        if lost or dups:
            print(f"| lost / duplicated over all {sc['key']} runs | | | {lost} / {dups} | |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": rounds, "load_average": load, "summary": summary, "runs": results}, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
