#!/usr/bin/env python3
"""Measures Hearth's cold start (exec -> "is ready" log line) and idle memory.

Usage: benches/startup.py [path/to/hearth] [runs]
Each run starts the binary in a fresh temporary directory (first start: creates the SQLite
database and the signing key), waits for the ready line, samples VmRSS after one second idle,
then stops it with SIGTERM.
"""
import os, signal, statistics, subprocess, sys, tempfile, time

binary = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/hearth")
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
starts, rss = [], []
for _ in range(runs):
    with tempfile.TemporaryDirectory() as cwd:
        env = dict(os.environ, HEARTH_LISTEN='["127.0.0.1:0"]', HEARTH_LOGGING__FORMAT="json")
        t0 = time.perf_counter()
        proc = subprocess.Popen([binary], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            if "is ready" in line:
                starts.append((time.perf_counter() - t0) * 1000)
                break
        time.sleep(1.0)
        with open(f"/proc/{proc.pid}/status") as status:
            rss.append(next(int(l.split()[1]) for l in status if l.startswith("VmRSS")) / 1024)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
print(f"cold start (exec -> ready): median {statistics.median(starts):.1f} ms, max {max(starts):.1f} ms over {runs} runs")
print(f"idle RSS after start: median {statistics.median(rss):.1f} MiB")
