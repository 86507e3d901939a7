"""Turns the loadgen results in benches/results/ into BENCHMARKS.md and the PNG plots in
benches/plots/. Called by compare.py; `benches/compare.sh --report-only` reruns just this."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BACKENDS = ("sqlite", "postgres")
SERVERS = ("synapse", "hearth")
COLOURS = {"synapse": "#0dbd8b", "hearth": "#d9480f", "hearth-ws": "#7048e8"}
LATENCY_SCENARIOS = [
    ("dm", "(a) 100 users in 50 DMs, 20 msg/s"),
    ("rooms", "(b) 10 rooms of 20, 50 msg/s"),
    ("closed", "(c) closed loop, 8 senders, room of 10"),
    ("bigroom", "(e) one room of 2,000, 2 msg/s"),
]


def load(results: Path, backend: str, key: str, server: str) -> dict | None:
    path = results / backend / f"{key}-{server}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}{unit}"
    return f"{value:.{digits}f}{unit}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "–"
    r = numerator / denominator
    return f"**{r:,.0f}×**" if r >= 10 else f"**{r:.1f}×**"


def losses(result: dict | None) -> str:
    if result is None:
        return "did not run"
    return f"{result['lost']} / {result['duplicated']}"


def cpu_ms_per_delivery(result: dict | None) -> float | None:
    if not result or not result.get("server_cpu_seconds") or not result.get("deliveries_per_sec"):
        return None
    return 1000 * result["server_cpu_seconds"] / (result["deliveries_per_sec"] * result["window_secs"])


def headline_rows(results: Path, backend: str) -> list[list[str]]:
    rows = []

    def get(key: str) -> tuple[dict | None, dict | None]:
        return load(results, backend, key, "synapse"), load(results, backend, key, "hearth")

    for key, title in (("dm", "(a) 50 DMs, 20 msg/s"), ("rooms", "(b) 10 rooms of 20, 50 msg/s")):
        s, h = get(key)
        if not (s or h):
            continue
        p99 = [r["e2e_latency_ms"]["p99"] if r else None for r in (s, h)]
        p50 = [r["e2e_latency_ms"]["p50"] if r else None for r in (s, h)]
        ach = [r["achieved_send_rate"] if r else None for r in (s, h)]
        cpu = [cpu_ms_per_delivery(r) for r in (s, h)]
        rows.append([title, "achieved msg/s", fmt(ach[0]), fmt(ach[1]), ""])
        rows.append(["", "end-to-end p50 (ms)", fmt(p50[0]), fmt(p50[1]), ratio(p50[0], p50[1]) + " lower"])
        rows.append(["", "end-to-end p99 (ms)", fmt(p99[0]), fmt(p99[1]), ratio(p99[0], p99[1]) + " lower"])
        rows.append(["", "server CPU ms per delivery", fmt(cpu[0], digits=2), fmt(cpu[1], digits=2), ratio(cpu[0], cpu[1]) + " less"])
        rows.append(["", "lost / duplicated", losses(s), losses(h), ""])
    s, h = get("closed")
    if s or h:
        rate = [r["achieved_send_rate"] if r else None for r in (s, h)]
        p99 = [r["e2e_latency_ms"]["p99"] if r else None for r in (s, h)]
        rows.append(["(c) closed loop, 8 senders, room of 10", "**messages/s**", fmt(rate[0]), fmt(rate[1]), ratio(rate[1], rate[0])])
        rows.append(["", "end-to-end p99 (ms)", fmt(p99[0]), fmt(p99[1]), ratio(p99[0], p99[1]) + " lower"])
        rows.append(["", "lost / duplicated", losses(s), losses(h), ""])
    s, h = get("idle")
    if s or h:
        per_user = [r.get("rss_per_user_kib") if r else None for r in (s, h)]
        rss = [r.get("server_rss_mib_max") if r else None for r in (s, h)]
        rows.append(["(d) 1,000 idle syncing users", "**server memory per user (KiB)**", fmt(per_user[0]), fmt(per_user[1]), ratio(per_user[0], per_user[1]) + " less"])
        rows.append(["", "server RSS (MiB)", fmt(rss[0]), fmt(rss[1]), ratio(rss[0], rss[1]) + " less"])
    s, h = get("bigroom")
    if s or h:
        p99 = [r["e2e_latency_ms"]["p99"] if r else None for r in (s, h)]
        dps = [r["deliveries_per_sec"] if r else None for r in (s, h)]
        cpu = [cpu_ms_per_delivery(r) for r in (s, h)]
        rows.append(["(e) one room of 2,000, 2 msg/s", "deliveries/s", fmt(dps[0]), fmt(dps[1]), ""])
        rows.append(["", "end-to-end p99 (ms)", fmt(p99[0]), fmt(p99[1]), ratio(p99[0], p99[1]) + " lower"])
        rows.append(["", "server CPU ms per delivery", fmt(cpu[0], digits=3), fmt(cpu[1], digits=3), ratio(cpu[0], cpu[1]) + " less"])
        rows.append(["", "lost / duplicated", losses(s), losses(h), ""])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cdf_points(result: dict) -> tuple[list[float], list[float]]:
    buckets = result.get("e2e_histogram_ms") or []
    total = sum(count for _, count in buckets)
    xs, ys, seen = [], [], 0
    for bound, count in buckets:
        if count == 0:
            continue
        seen += count
        xs.append(bound)
        ys.append(seen / total)
    return xs, ys


def plot_cdfs(results: Path, plots: Path, backend: str) -> str | None:
    present = [(k, t) for k, t in LATENCY_SCENARIOS if any(load(results, backend, k, s) for s in SERVERS)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], present):
        series = [(s, load(results, backend, key, s)) for s in SERVERS]
        ws = load(results, backend, f"{key}-ws", "hearth")
        if ws:
            series.append(("hearth-ws", ws))
        for name, result in series:
            if not result:
                continue
            xs, ys = cdf_points(result)
            label = {"hearth-ws": "Hearth (WebSocket)", "hearth": "Hearth (/sync)", "synapse": "Synapse (/sync)"}[name]
            ax.step(xs, ys, where="post", label=label, color=COLOURS[name])
        ax.set_xscale("log")
        ax.set_xlabel("send → receive latency (ms, log)")
        ax.set_ylim(0, 1.01)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("fraction of deliveries")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"End-to-end latency CDF ({backend})", fontsize=11)
    fig.tight_layout()
    name = f"latency-cdf-{backend}.png"
    fig.savefig(plots / name, dpi=110)
    plt.close(fig)
    return name


def sweep(results: Path, backend: str, server: str) -> list[dict]:
    runs = []
    for path in sorted((results / backend).glob(f"sweep-*-{server}.json")):
        runs.append(json.loads(path.read_text()))
    return sorted(runs, key=lambda r: r["offered_rate"] or 0)


def plot_sweep(results: Path, plots: Path, backend: str) -> str | None:
    data = {s: sweep(results, backend, s) for s in SERVERS}
    if not any(data.values()):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    top = 1.0
    for server, runs in data.items():
        if not runs:
            continue
        offered = [r["offered_rate"] for r in runs]
        top = max(top, *offered)
        left.plot(offered, [r["achieved_send_rate"] for r in runs], "o-", color=COLOURS[server], label=server.capitalize())
        right.plot(offered, [r["e2e_latency_ms"]["p99"] for r in runs], "o-", color=COLOURS[server], label=server.capitalize())
    left.plot([1, top], [1, top], ":", color="grey", label="offered = achieved")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (messages/s into 10 rooms of 20)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("achieved messages/s")
    right.set_ylabel("end-to-end p99 (ms)")
    fig.suptitle(f"Throughput and latency vs offered load ({backend})", fontsize=11)
    fig.tight_layout()
    name = f"throughput-{backend}.png"
    fig.savefig(plots / name, dpi=110)
    plt.close(fig)
    return name


def socket_figures(result: dict | None) -> dict:
    """The sockets scenario's own measurements (loadgen nests them under "sockets")."""
    return (result or {}).get("sockets") or {}


def plot_memory(results: Path, plots: Path) -> str | None:
    bars = []
    for backend in BACKENDS:
        for server in SERVERS:
            r = load(results, backend, "idle", server)
            if r and r.get("rss_per_user_kib"):
                bars.append((f"{server.capitalize()}\n{backend}", r["rss_per_user_kib"], COLOURS[server]))
    sockets = socket_figures(load(results, "sqlite", "sockets", "hearth"))
    if sockets.get("rss_per_socket_kib"):
        bars.append(("Hearth\nWebSocket", sockets["rss_per_socket_kib"], COLOURS["hearth-ws"]))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    for i, (_, value, _) in enumerate(bars):
        ax.text(i, value, f"{value:,.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("server memory per idle connected user (KiB, log)")
    ax.set_title("Memory per idle user: 1,000 long-polling users, 10,000 WebSockets", fontsize=10)
    fig.tight_layout()
    name = "idle-memory.png"
    fig.savefig(plots / name, dpi=110)
    plt.close(fig)
    return name


def transport_rows(results: Path, backend: str) -> list[list[str]]:
    rows = []
    for key, title in (("rooms", "(b) 10 rooms of 20, 50 msg/s"), ("closed", "(c) closed loop, room of 10")):
        sync, ws = load(results, backend, key, "hearth"), load(results, backend, f"{key}-ws", "hearth")
        if not (sync and ws):
            continue
        for metric, pick in (
            ("messages/s", lambda r: r["achieved_send_rate"]),
            ("end-to-end p50 (ms)", lambda r: r["e2e_latency_ms"]["p50"]),
            ("end-to-end p99 (ms)", lambda r: r["e2e_latency_ms"]["p99"]),
            ("server CPU ms per delivery", cpu_ms_per_delivery),
        ):
            rows.append([title if metric == "messages/s" else "", metric, fmt(pick(sync), digits=2), fmt(pick(ws), digits=2)])
        rows.append(["", "lost / duplicated", losses(sync), losses(ws)])
    return rows


def sweep_rows(results: Path, backend: str) -> list[list[str]]:
    rows = []
    for server in SERVERS:
        for r in sweep(results, backend, server):
            rows.append([
                server.capitalize(),
                fmt(r["offered_rate"]),
                fmt(r["achieved_send_rate"]),
                fmt(r["e2e_latency_ms"]["p50"]),
                fmt(r["e2e_latency_ms"]["p99"]),
                fmt(r.get("server_cores_avg"), digits=2),
                losses(r),
            ])
    return rows


def commands(results: Path) -> list[str]:
    lines = []
    for backend in BACKENDS:
        for path in sorted((results / backend).glob("*.json")) if (results / backend).exists() else []:
            data = json.loads(path.read_text())
            if "command" in data:
                lines.append(f"{backend:8} {path.stem:22} {data['command']}")
    return lines


def write(results: Path, plots: Path, out: Path) -> None:
    plots.mkdir(parents=True, exist_ok=True)
    facts = json.loads((results / "machine.json").read_text()) if (results / "machine.json").exists() else {}
    parts = [
        "# Benchmarks: Hearth and Synapse, same machine, same run",
        "",
        "Every number below comes from one run of `benches/compare.sh`: each scenario is run against a fresh "
        "Synapse and then a fresh Hearth (empty data directory and database each time), driven by the same "
        "load generator (`benches/loadgen`) through the standard Client-Server API. Ratios compare the two "
        "servers within that run. How the servers are configured, and why that is fair, is in "
        "[`benches/synapse/README.md`](benches/synapse/README.md); the load generator's method is in "
        "[`benches/loadgen/README.md`](benches/loadgen/README.md).",
        "",
        "**Reproduce:** `benches/compare.sh` (about an hour; `benches/compare.sh --backends sqlite --scenarios closed` "
        "for one scenario). It builds Hearth and loadgen in release mode, installs the pinned Synapse into a "
        "virtualenv, runs everything on 127.0.0.1 and rewrites this file, `benches/results/` and `benches/plots/`.",
        "",
        "## Machine",
        "",
        table(["", ""], [[k, str(v)] for k, v in facts.items()]) if facts else "(unknown)",
        "",
    ]
    for backend in BACKENDS:
        rows = headline_rows(results, backend)
        if not rows:
            continue
        parts += [
            f"## {'SQLite' if backend == 'sqlite' else 'PostgreSQL'}: the scenarios",
            "",
            "“lower”/“less” ratios are Synapse ÷ Hearth; throughput ratios are Hearth ÷ Synapse. "
            "Latency is from the sender's clock before the send request to the receiver's clock when the "
            "event arrives in its `/sync` response, over every member of the room.",
            "",
            table(["scenario", "metric", "Synapse", "Hearth", "Hearth vs Synapse"], rows),
            "",
        ]
        cdf = plot_cdfs(results, plots, backend)
        if cdf:
            parts += [f"![latency CDF, {backend}](benches/plots/{cdf})", ""]
        srows = sweep_rows(results, backend)
        if srows:
            parts += [
                f"### Offered load sweep ({backend}): 10 rooms of 20",
                "",
                "Each rate runs 15 s on a fresh server; a server's sweep stops at the first rate it cannot keep "
                "up with (achieved < 90 % of offered, or p99 > 5 s).",
                "",
                table(["server", "offered msg/s", "achieved msg/s", "p50 (ms)", "p99 (ms)", "server cores", "lost / dup"], srows),
                "",
            ]
            sw = plot_sweep(results, plots, backend)
            if sw:
                parts += [f"![throughput vs offered load, {backend}](benches/plots/{sw})", ""]
        trows = transport_rows(results, backend)
        if trows:
            parts += [
                f"### Hearth's WebSocket transport vs `/sync` ({backend})",
                "",
                "The same scenarios against Hearth, with receivers holding one WebSocket each "
                "(`spec/websocket.md`) instead of long-polling `/sync`; in closed loop the senders send over "
                "their socket too.",
                "",
                table(["scenario", "metric", "/sync", "WebSocket"], trows),
                "",
            ]
    sockets = load(results, "sqlite", "sockets", "hearth")
    memory = plot_memory(results, plots)
    if sockets or memory:
        parts += ["## Memory per idle user", ""]
        if sockets:
            figures = socket_figures(sockets)
            parts += [
                f"(f) {figures.get('ready', 0):,} of {figures.get('sockets', 0):,} idle subscribed WebSockets "
                f"held open on Hearth: **{fmt(figures.get('rss_per_socket_kib'))} KiB per socket** "
                f"(server RSS {fmt(figures.get('server_rss_mib_before_sockets'))} MiB before the sockets, "
                f"{fmt(figures.get('server_rss_mib_after_sockets'))} MiB with all of them open, "
                f"{fmt(figures.get('server_rss_mib_after_close'))} MiB 10 s after closing them). Synapse has no "
                "WebSocket transport; compare with its memory per long-polling user above.",
                "",
            ]
        if memory:
            parts += [f"![memory per idle user](benches/plots/{memory})", ""]
    # Federation figures: written by federation-tests/bench.rs (its own run and command, kept
    # as Markdown beside the other results).
    for federation in sorted(results.glob("federation-*.md")) + sorted(results.glob("media*.md")) + sorted(results.glob("e2ee*.md")):
        parts += [federation.read_text().strip(), ""]
    # What the people who ran it noticed (hand-written, kept with the results it describes).
    notes = results / "NOTES.md"
    if notes.exists():
        parts += ["## Reading this run", "", notes.read_text().strip(), ""]
    cmds = commands(results)
    if cmds:
        parts += [
            "## Commands",
            "",
            "Each run's exact loadgen command (the server URL and pid differ per run):",
            "",
            "```",
            *cmds,
            "```",
            "",
        ]
    out.write_text("\n".join(parts))
