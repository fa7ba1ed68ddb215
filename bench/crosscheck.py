#!/usr/bin/env python3
"""Cross-check corvid-bench against an independent generator on the same broker.

Why: a load generator that is itself the bottleneck, or that counts wrongly, makes every broker
figure meaningless. This runs paho-bench (bench/crosscheck/paho-bench: Eclipse Paho Go client,
mqtt-benchmark's publish-and-wait-for-token method, built into ~/.cache/corvid/tools), Debian's
mosquitto_pub/mosquitto_sub (1 pair, QoS 0) and corvid-bench on the same scenarios -- 10
publisher/subscriber pairs, 64 B payloads, QoS 0 and 1 --
alternating, each on a fresh broker (mosquitto, or corvid with --broker corvid) on 127.0.0.1, and
prints both generators' msg/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import shutil
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (same directory; shares broker start/stop)

TOOLS = Path.home() / ".cache" / "corvid" / "tools"


def build_paho() -> str:
    out = TOOLS / "paho-bench"
    if not out.exists():
        TOOLS.mkdir(parents=True, exist_ok=True)
        src = Path(__file__).resolve().parent / "crosscheck" / "paho-bench"
        compare.log("go build paho-bench")
        subprocess.run(["go", "build", "-o", str(out), "."], cwd=src, check=True)
    return str(out)


def mosquitto_clients(port: int, count: int) -> dict:
    """1->1 QoS0 with Debian's own clients: mosquitto_pub -l publishes one message per stdin line,
    mosquitto_sub -C exits after COUNT messages; delivered msg/s = COUNT / (sub exit - pub start)."""
    lines = ("x" * 63 + "\n") * count
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", "xcheck/one", "-q", "0", "-C", str(count)],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # let the subscription land before publishing
    t0 = time.monotonic()
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", "xcheck/one", "-q", "0", "-l"],
        input=lines.encode(), check=True, timeout=120,
    )
    t1 = time.monotonic()
    try:
        sub.wait(timeout=60)
        received = count
    except subprocess.TimeoutExpired:
        sub.kill()
        received = -1  # unknown: mosquitto_sub does not say how many it got
    t2 = time.monotonic()
    return {"published_msgs_per_sec": count / (t1 - t0), "delivered_msgs_per_sec": count / (t2 - t0),
            "published": count, "received": received if received >= 0 else 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--count", type=int, default=20000, help="messages per paho publisher")
    ap.add_argument("--broker", choices=["mosquitto", "corvid"], default="mosquitto",
                    help="broker to run both generators against (corvid: the release corvid-broker)")
    ap.add_argument("--out", help="JSON output (default target/bench/crosscheck-BROKER.json)")
    args = ap.parse_args()
    target_dir = Path(os.environ.get("CARGO_TARGET_DIR", compare.REPO / "target"))
    bench = str(target_dir / "release" / "corvid-bench")
    paho = build_paho()
    workdir = compare.REPO / "target" / "bench" / f"work-crosscheck-{args.broker}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    if args.broker == "corvid":
        broker: compare.Broker = compare.Corvid(workdir, str(target_dir / "release" / "corvid-broker"))
    else:
        broker = compare.Mosquitto(workdir, compare.ensure_mosquitto())
    out_path = Path(args.out or compare.REPO / "target" / "bench" / f"crosscheck-{args.broker}.json")
    pairs = 10
    rows = []
    for qos in (0, 1):
        variants = {
            "paho-bench (wait per publish)": lambda port: [paho, "-broker", f"tcp://127.0.0.1:{port}",
                                                         "-clients", str(pairs), "-count", str(args.count),
                                                         "-qos", str(qos), "-size", "64"],
            "corvid-bench --inflight 1": lambda port: [bench, "pub-sub", "--port", str(port), "--scenario", "p2p",
                                                       "--publishers", str(pairs), "--qos", str(qos), "--rate", "0",
                                                       "--inflight", "1", "--duration", "5", "--warmup", "1", "--json"],
            "corvid-bench (default window)": lambda port: [bench, "pub-sub", "--port", str(port), "--scenario",
                                                           "p2p", "--publishers", str(pairs), "--qos", str(qos),
                                                           "--rate", "0", "--duration", "5", "--warmup", "1",
                                                           "--json"],
        }
        if qos == 0 and shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub"):
            variants["mosquitto_pub -l / mosquitto_sub -C, 1 pair"] = "clients"
            variants["corvid-bench, 1 pair"] = lambda port: [bench, "pub-sub", "--port", str(port), "--scenario",
                                                            "p2p", "--publishers", "1", "--qos", "0", "--payload",
                                                            "63", "--rate", "0", "--duration", "3", "--warmup",
                                                            "1", "--json"]
        results: dict[str, list] = {k: [] for k in variants}
        for r in range(args.rounds):
            names = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in names:
                broker.start()
                try:
                    if variants[name] == "clients":
                        rep = mosquitto_clients(broker.port, args.count * 5)
                    else:
                        out = subprocess.run(variants[name](broker.port), capture_output=True, text=True,
                                             timeout=300)
                        if out.returncode != 0:
                            raise RuntimeError(out.stderr[-1000:])
                        rep = json.loads(out.stdout.strip().splitlines()[-1])
                finally:
                    broker.stop()
                if "delivered_msgs_per_sec" in rep:
                    fig = {"delivered": rep["delivered_msgs_per_sec"],
                           "published": rep.get("publish_msgs_per_sec", rep.get("published_msgs_per_sec")),
                           "lost": rep["published"] - rep["received"]}
                else:
                    fig = {"delivered": rep["delivered_per_sec"], "published": rep["sent_per_sec"],
                           "lost": rep["lost"]}
                compare.log(f"qos{qos} {name}: {fig}")
                results[name].append(fig)
        for name, figs in results.items():
            rows.append({
                "qos": qos, "generator": name,
                "published_per_sec": statistics.median(f["published"] for f in figs),
                "delivered_per_sec": statistics.median(f["delivered"] for f in figs),
                "lost": sum(f["lost"] for f in figs), "runs": figs,
            })
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(rows, indent=2))
    print("| broker | QoS | generator | published msg/s | delivered msg/s | lost |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {args.broker} | {r['qos']} | {r['generator']} | {r['published_per_sec']:,.0f} | {r['delivered_per_sec']:,.0f} | {r['lost']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
