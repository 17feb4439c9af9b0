#!/usr/bin/env python3
"""An independent client for serve_bench's numbers (issue 15: they must agree within 5%).

Replays the requests serve_bench wrote with --dump-requests against the same gateway, one at
a time (concurrency 1), timing each stream with Python's http.client: TTFT (the first SSE
chunk carrying a token), TPOT ((end - TTFT) / (tokens - 1)), end-to-end latency and output
tokens per second. With --compare it reads serve_bench's --json and checks that the medians
and the throughput of its first run agree within --tolerance; exit 1 when they do not.

    build/bin/serve_bench --url 127.0.0.1:8000 --model M --num-requests 40 \\
        --dump-requests /tmp/req.jsonl --json /tmp/sb.json
    python3 tools/serve_check.py --url 127.0.0.1:8000 --requests /tmp/req.jsonl \\
        --compare /tmp/sb.json
"""
import argparse
import http.client
import json
import statistics
import sys
import time

import sse  # tools/sse.py, next to this script


def tokens_in(chunk):
    n = 0
    for c in chunk.get("choices") or []:
        holder = c.get("delta") if isinstance(c.get("delta"), dict) else c
        ids = holder.get("token_ids")
        if isinstance(ids, list):
            n += len(ids)
        elif holder.get("text") or holder.get("content"):
            n += 1
    return n


def run_one(host, port, path, body, timeout):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    token_times, usage_out, done = [], None, False
    for data in sse.data_lines(resp):
        now = time.perf_counter() - t0
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        token_times += [now] * tokens_in(chunk)
        usage = chunk.get("usage")
        if isinstance(usage, dict) and "completion_tokens" in usage:
            usage_out = usage["completion_tokens"]
    end = time.perf_counter() - t0
    conn.close()
    if not done or not token_times:
        raise RuntimeError("stream ended without [DONE] or without a token")
    out = usage_out if usage_out is not None else len(token_times)
    tpot = (end - token_times[0]) / (out - 1) if out > 1 else None
    return {"ttft": token_times[0], "tpot": tpot, "e2e": end, "out": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="gateway HOST:PORT")
    ap.add_argument("--requests", required=True, help="serve_bench --dump-requests file")
    ap.add_argument("--compare", help="serve_bench --json file (its first run is compared)")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--timeout-s", type=float, default=600)
    a = ap.parse_args()
    host, port = a.url.rsplit(":", 1)
    reqs = [json.loads(l) for l in open(a.requests) if l.strip()]
    results, t_first, t_last = [], None, None
    for r in reqs:
        start = time.perf_counter()
        one = run_one(host, int(port), r["path"], r["body"], a.timeout_s)
        if r.get("warmup"):
            continue
        t_first = start if t_first is None else t_first
        t_last = start + one["e2e"]
        results.append(one)
    if not results:
        sys.exit("serve_check: no measured request in " + a.requests)
    ours = {
        "ttft_p50_ms": statistics.median(x["ttft"] for x in results) * 1e3,
        "tpot_p50_ms": statistics.median(x["tpot"] for x in results if x["tpot"] is not None) * 1e3,
        "e2e_p50_ms": statistics.median(x["e2e"] for x in results) * 1e3,
        "output_tokens_per_s": sum(x["out"] for x in results) / (t_last - t_first),
    }
    print(f"serve_check: {len(results)} requests at concurrency 1")
    for k, v in ours.items():
        print(f"  {k:22s} {v:10.2f}")
    if not a.compare:
        return 0
    sb = json.load(open(a.compare))["runs"][0]["summary"]
    theirs = {
        "ttft_p50_ms": sb["ttft_ms"]["p50"],
        "tpot_p50_ms": sb["tpot_ms"]["p50"],
        "e2e_p50_ms": sb["e2e_ms"]["p50"],
        "output_tokens_per_s": sb["output_tokens_per_s"],
    }
    worst = 0.0
    print(f"  {'':22s} {'check':>10s} {'serve_bench':>12s} {'ratio':>7s}")
    for k in ours:
        ratio = theirs[k] / ours[k] if ours[k] else float("inf")
        worst = max(worst, abs(ratio - 1))
        print(f"  {k:22s} {ours[k]:10.2f} {theirs[k]:12.2f} {ratio:7.3f}")
    ok = worst <= a.tolerance
    print(f"serve_check: largest difference {100 * worst:.1f}% "
          f"({'within' if ok else 'OVER'} {100 * a.tolerance:.0f}%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
