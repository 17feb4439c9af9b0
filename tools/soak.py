#!/usr/bin/env python3
"""Soak benchmark: a real local dmoe cluster under mixed traffic with periodic
expert-server kills (issue 13, item 3).

Starts dmoe-expert x N, a dmoe-router with the placement controller and a
dmoe-gateway (from --bin-dir) on a generated model, with every routed expert
on at least two servers (by default every server holds every expert:
--slots-per-server = n_routed_experts), so that killing one server loses no
request. Then, for --minutes:

  * --clients threads send a mix of /v1/completions and /v1/chat/completions,
    streaming and not, with varying prompts, max_tokens, stop strings, seeds,
    and occasional client disconnects mid-stream (HTTP/1.1 keep-alive via
    http.client; an idle connection the server closed is reopened once);
    every answer is checked (status, JSON, finish_reason, tokens <= max_tokens);
  * every --kill-every seconds one expert server gets SIGKILL (rotating over
    servers 0..--kill-among-1; by default all but the last); once
    the controller has moved its slots away (it is "lost" after
    --server-lost-after-s; or, with --restart-delay-s D, after D seconds
    without waiting, as Kubernetes restarts a crashed pod at its address, and
    the controller must reload its slots) it is restarted on the same port
    with --join, and
    the tool waits until it holds slots again and checks that every routed
    expert of every MoE layer still has >= 2 replicas;
  * VmRSS of every process (by role) is sampled every --rss-every seconds.

At the end: a table (and --json PATH) with requests ok / failed by kind and
status (failures with their bodies, first 20), throughput, TTFT and
inter-token gap percentiles (client-side, streaming), RSS at warm-up end vs
end per process, kills and restarts, and PASS / FAIL against the goals:
0 failed requests (client disconnects excluded), no process exiting on its
own, every restart rejoined, RSS growth < --rss-growth-limit % after warm-up
for the gateway, the router and every expert server never restarted.

Python 3 standard library only. Exit status: 0 PASS, 1 FAIL, 2 error.
Every child runs in its own process group; all of them are stopped on exit,
Ctrl-C, SIGTERM or error. Logs stay in the work directory (printed).
"""

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import sse  # tools/sse.py, next to this script

WORDS = ("the quick brown fox jumps over a lazy dog while seven engineers measure "
         "expert load across servers and write notes about tokens latency memory "
         "placement routing replicas gateway router streams of text in the night "
         "hello world one two three four five red green blue ocean mountain river").split()
STOPS = ["e", "the", ".", "\n", "ing", " a", "zz", "Q"]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You write poems."]


def now():
    return time.monotonic()


def percentiles(xs):
    """p50/p90/p99/max (nearest rank) of xs in milliseconds; None when empty."""
    if not xs:
        return None
    s = sorted(xs)

    def p(q):
        return s[min(len(s) - 1, max(0, int(round(q / 100.0 * len(s) + 0.5)) - 1))]

    return {"n": len(s), "p50": p(50), "p90": p(90), "p99": p(99), "max": s[-1]}


def read_status(pid):
    """(VmRSS kB, RssAnon kB, Threads) of a live process, or None."""
    v = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in ("VmRSS", "RssAnon", "Threads"):
                    v[k] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (v["VmRSS"], v.get("RssAnon", 0), v.get("Threads", 0)) if "VmRSS" in v else None


# ----------------------------------------------------------------------------
# The cluster


class Proc:
    def __init__(self, role, argv, log, port_file):
        self.role, self.argv, self.log, self.port_file = role, argv, log, port_file
        self.popen = None
        self.port = None
        self.started = None
        self.expected_exit = False

    def start(self):
        try:
            os.remove(self.port_file)
        except FileNotFoundError:
            pass
        logf = open(self.log, "wb")
        # Own process group: Ctrl-C on the terminal reaches only this script,
        # which stops the cluster in order.
        self.popen = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()
        self.started = now()
        self.expected_exit = False

    def wait_port(self, timeout_s):
        end = now() + timeout_s
        while now() < end:
            try:
                with open(self.port_file) as f:
                    txt = f.read().strip()
                if txt:
                    self.port = int(txt)
                    return
            except (OSError, ValueError):
                pass
            if self.popen.poll() is not None:
                raise RuntimeError("%s exited (%s) during start-up; see %s" %
                                   (self.role, self.popen.returncode, self.log))
            time.sleep(0.05)
        raise RuntimeError("%s reported no port within %d s; see %s" % (self.role, timeout_s, self.log))

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig):
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass


class Cluster:
    def __init__(self, args, work):
        self.args, self.work = args, work
        self.bin = os.path.abspath(args.bin_dir)
        self.model = os.path.join(work, "model")
        self.experts = []  # Proc per server index (the current incarnation)
        self.router = None
        self.gateway = None
        self.incarnations = {}  # role -> number of starts
        self.lock = threading.Lock()

    def _proc(self, role, argv):
        n = self.incarnations.get(role, 0)
        self.incarnations[role] = n + 1
        suffix = "" if n == 0 else ".restart%d" % n
        return Proc(role, argv, os.path.join(self.work, role + suffix + ".log"),
                    os.path.join(self.work, role + ".port"))

    def make_model(self):
        a = self.args
        subprocess.run([os.path.join(self.bin, "dmoe"), "make-model", "--preset", a.preset,
                        "--out", self.model, "--seed", str(a.seed)], check=True,
                       stdout=subprocess.DEVNULL)
        with open(os.path.join(self.model, "config.json")) as f:
            cfg = json.load(f)
        self.num_experts = int(cfg["n_routed_experts"])
        first_k = int(cfg.get("first_k_dense_replace", 0))
        freq = int(cfg.get("moe_layer_freq", 1))
        self.moe_layers = [l for l in range(int(cfg["num_hidden_layers"]))
                           if l >= first_k and l % freq == 0]
        n, e = a.servers, self.num_experts
        self.slots = a.slots_per_server or e
        if self.slots > e:
            raise RuntimeError("--slots-per-server %d > %d experts" % (self.slots, e))
        if n * self.slots < 2 * e or n < 2:
            raise RuntimeError("%d servers x %d slots cannot give each of %d experts 2 replicas"
                               % (n, self.slots, e))
        # Cyclic: server s holds experts s*S .. s*S+S-1 (mod E): every expert
        # on floor or ceil of N*S/E servers (>= 2), never twice on one server.
        servers = [[(s * self.slots + j) % e for j in range(self.slots)] for s in range(n)]
        placement = {"version": 1, "num_servers": n,
                     "layers": [{"layer": l, "servers": servers} for l in self.moe_layers]}
        self.placement_file = os.path.join(self.work, "placement.json")
        with open(self.placement_file, "w") as f:
            json.dump(placement, f)

    def expert_argv(self, i, join=None, port=0):
        a = self.args
        argv = [os.path.join(self.bin, "dmoe-expert"), "--model", self.model,
                "--port", str(port), "--port-file", os.path.join(self.work, "expert-%d.port" % i),
                "--metrics-port", "0", "--threads", str(a.threads), "--dtype", a.dtype]
        if join:
            argv += ["--join", join]
        else:
            argv += ["--placement", self.placement_file, "--server-index", str(i)]
        return argv

    def start(self):
        a = self.args
        for i in range(a.servers):
            p = self._proc("expert-%d" % i, self.expert_argv(i))
            p.start()
            self.experts.append(p)
        for p in self.experts:
            p.wait_port(120)
        addrs = ",".join("127.0.0.1:%d" % p.port for p in self.experts)
        self.router = self._proc("router", [
            os.path.join(self.bin, "dmoe-router"), "--model", self.model, "--experts", addrs,
            "--placement", self.placement_file, "--controller",
            "--slots-per-server", str(self.slots),
            "--server-lost-after-s", str(a.server_lost_after_s),
            "--port", "0", "--port-file", os.path.join(self.work, "router.port"),
            "--metrics-port", "0", "--threads", str(a.threads), "--dtype", a.dtype])
        self.router.start()
        self.router.wait_port(120)
        self.gateway = self._proc("gateway", [
            os.path.join(self.bin, "dmoe-gateway"), "--routers", "127.0.0.1:%d" % self.router.port,
            "--http-port", "0", "--port-file", os.path.join(self.work, "gateway.port"),
            "--tokenizer", self.model])
        self.gateway.start()
        self.gateway.wait_port(60)
        end = now() + 60
        while now() < end:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=5)
                c.request("GET", "/health")
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("gateway /health not 200 within 60 s; see " + self.gateway.log)

    def procs(self):
        with self.lock:
            return [p for p in [self.gateway, self.router] + self.experts if p is not None]

    def placement(self):
        """(server addresses, {layer: [[experts] per server]}) from `dmoe ctl placement`."""
        r = subprocess.run([os.path.join(self.bin, "dmoe"), "ctl", "placement", "--router",
                            "127.0.0.1:%d" % self.router.port, "--json"],
                           capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            raise RuntimeError("dmoe ctl placement: " + (r.stderr or r.stdout).strip())
        j = json.loads(r.stdout)
        layers = {int(l["layer"]): l["servers"] for l in j["placement"]["layers"]}
        return j["servers"], layers, j.get("version")

    def slots_of(self, index):
        addrs, layers, _ = self.placement()
        addr = "127.0.0.1:%d" % self.experts[index].port
        if addr not in addrs:
            return 0
        s = addrs.index(addr)
        return sum(len(srv[s]) if s < len(srv) else 0 for srv in layers.values())

    def min_replicas(self):
        _, layers, version = self.placement()
        m = None
        for srv in layers.values():
            count = [0] * self.num_experts
            for experts in srv:
                for e in experts:
                    count[e] += 1
            m = min(count) if m is None else min(m, min(count))
        return m, version

    def stop(self):
        """Front to back: gateway and router SIGTERM (drain), experts SIGINT
        (no scale-in leave), then SIGKILL whatever is left."""
        def reap(ps, budget):
            end = now() + budget
            for p in ps:
                while p.alive() and now() < end:
                    time.sleep(0.05)
        for p in [self.gateway, self.router]:
            if p is not None:
                p.expected_exit = True
                p.signal(signal.SIGTERM)
                reap([p], 8)
        for p in self.experts:
            p.expected_exit = True
            p.signal(signal.SIGINT)
        reap(self.experts, 8)
        for p in self.procs():
            if p.alive():
                p.signal(signal.SIGKILL)
                try:
                    p.popen.wait(5)
                except subprocess.TimeoutExpired:
                    pass


# ----------------------------------------------------------------------------
# Traffic


class Client:
    """One keep-alive HTTP/1.1 connection to the gateway; reopened once when
    the server closed it while idle (the request then never reached it)."""

    def __init__(self, port, timeout):
        self.port, self.timeout = port, timeout
        self.conn = None
        self.reconnects = 0

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(self, path, body):
        for _ in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            reused = self.conn.sock is not None
            try:
                self.conn.request("POST", path, body=body,
                                  headers={"Content-Type": "application/json"})
                return self.conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ConnectionAbortedError):
                self.close()
                if not reused:
                    raise
                self.reconnects += 1
        raise ConnectionError("unreachable")


def make_request(rng, tokenizer_words=WORDS):
    chat = rng.random() < 0.5
    stream = rng.random() < 0.6
    max_tokens = rng.choice([1, 2, 4, 8, 16, 24, 32, 48, 64])
    plen = rng.choice([1, 3, 8, 20, 60, 150])
    text = " ".join(rng.choice(tokenizer_words) for _ in range(plen))
    body = {"temperature": rng.choice([0, 0.7, 1.0])}
    if chat:
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
        if rng.random() < 0.3:
            msgs += [{"role": "user", "content": "hello there"},
                     {"role": "assistant", "content": "hello, how can I help"}]
        msgs.append({"role": "user", "content": text})
        body["messages"] = msgs
        body["max_completion_tokens" if rng.random() < 0.3 else "max_tokens"] = max_tokens
    else:
        body["prompt"] = text
        body["max_tokens"] = max_tokens
    if rng.random() < 0.3:
        body["stop"] = rng.sample(STOPS, rng.choice([1, 2]))
    if rng.random() < 0.5:
        body["seed"] = rng.randrange(1 << 31)
    if rng.random() < 0.2:
        body["top_p"] = 0.9
    if stream:
        body["stream"] = True
    kind = ("chat" if chat else "completions") + ("/stream" if stream else "")
    disconnect_after = rng.randint(1, 4) if stream and rng.random() < 0.05 else None
    return kind, body, max_tokens, disconnect_after


def stop_problems(body, text):
    """A stop string ends the answer before its first occurrence: never in the text."""
    stops = body.get("stop") or []
    return ["stop string %r in the answer" % s for s in stops if isinstance(s, str) and s in text]


def check_final(kind, obj, max_tokens, body):
    """Problems with a non-streaming answer (empty list: fine) and its tokens."""
    ch = (obj.get("choices") or [None])[0]
    if not isinstance(ch, dict):
        return ["no choices[0]"], 0
    problems = []
    if ch.get("finish_reason") not in ("stop", "length"):
        problems.append("finish_reason %r" % ch.get("finish_reason"))
    if kind.startswith("completions"):
        ids, text = ch.get("token_ids"), ch.get("text")
    else:
        msg = ch.get("message") or {}
        ids, text = msg.get("token_ids"), msg.get("content")
    if not isinstance(text, str):
        problems.append("no text")
        text = ""
    problems += stop_problems(body, text)
    if not isinstance(ids, list):
        problems.append("no token_ids")
        ids = []
    usage = obj.get("usage") or {}
    ct = usage.get("completion_tokens")
    if not isinstance(ct, int):
        problems.append("no usage.completion_tokens")
        ct = len(ids)
    n = max(len(ids), ct)
    if n > max_tokens:
        problems.append("%d tokens > max_tokens %d" % (n, max_tokens))
    return problems, n


def run_one(client, rng, rec_gaps):
    kind, body, max_tokens, disconnect_after = make_request(rng)
    path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
    res = {"kind": kind, "status": None, "ok": False, "disconnect": False, "error": None,
           "tokens": 0, "ttft_ms": None, "t0": now(), "max_tokens": max_tokens}
    payload = json.dumps(body)
    t0 = now()
    try:
        resp = client.send(path, payload)
        res["status"] = resp.status
        if resp.status != 200:
            res["error"] = resp.read()[:2000].decode("utf-8", "replace")
            return res, body
        if not body.get("stream"):
            raw = resp.read()
            try:
                obj = json.loads(raw)
            except ValueError as e:
                res["error"] = "bad JSON (%s): %s" % (e, raw[:500])
                return res, body
            problems, res["tokens"] = check_final(kind, obj, max_tokens, body)
            if problems:
                res["error"] = "; ".join(problems) + ": " + raw[:1000].decode("utf-8", "replace")
            else:
                res["ok"] = True
            return res, body
        # SSE
        ctype = resp.getheader("Content-Type", "")
        if "text/event-stream" not in ctype:
            res["error"] = "stream with Content-Type %r" % ctype
            resp.read()
            return res, body
        events, tokens, finish, usage_ct, done, last = 0, 0, None, None, False, None
        text = []
        gaps = []
        for data in sse.data_lines(resp):
            if data == b"[DONE]":
                done = True
                break
            try:
                ev = json.loads(data)
            except ValueError as e:
                res["error"] = "bad SSE JSON (%s): %s" % (e, data[:500])
                client.close()
                return res, body
            if "error" in ev:
                res["error"] = "error event: " + data[:1000].decode("utf-8", "replace")
                client.close()
                return res, body
            ch = (ev.get("choices") or [{}])[0]
            ids = ch.get("token_ids")
            piece = ch.get("text")
            if isinstance(ch.get("delta"), dict):
                if ids is None:
                    ids = ch["delta"].get("token_ids")
                piece = ch["delta"].get("content")
            if isinstance(piece, str):
                text.append(piece)
            n = len(ids) if isinstance(ids, list) else 0
            if n:
                t = now()
                if last is None:
                    res["ttft_ms"] = (t - t0) * 1000
                else:
                    gaps.append((t - last) * 1000)
                last = t
                tokens += n
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
            if isinstance(ev.get("usage"), dict):
                usage_ct = ev["usage"].get("completion_tokens")
            events += 1
            if disconnect_after is not None and events >= disconnect_after:
                client.close()
                res["disconnect"] = True
                res["tokens"] = tokens
                return res, body
        if done:
            resp.read()  # the end of the chunked body, so the connection can be reused
        else:
            client.close()
        res["tokens"] = max(tokens, usage_ct or 0)
        problems = []
        if not done:
            problems.append("stream ended without [DONE]")
        if finish not in ("stop", "length"):
            problems.append("finish_reason %r" % finish)
        if res["tokens"] > max_tokens:
            problems.append("%d tokens > max_tokens %d" % (res["tokens"], max_tokens))
        problems += stop_problems(body, "".join(text))
        if problems:
            res["error"] = "; ".join(problems)
        else:
            res["ok"] = True
            rec_gaps.extend(gaps)
        return res, body
    except (OSError, http.client.HTTPException) as e:
        client.close()
        res["error"] = "%s: %s" % (type(e).__name__, e)
        return res, body
    finally:
        res["t1"] = now()


# ----------------------------------------------------------------------------
# The run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30, help="traffic duration (default 30)")
    ap.add_argument("--kill-every", type=float, default=60,
                    help="seconds between expert-server kills, rotating (0 = none; default 60)")
    ap.add_argument("--kill-among", type=int, default=None,
                    help="kill only servers 0..K-1 (default: all but the last, whose RSS growth "
                         "is then gated like the gateway's and router's)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--servers", type=int, default=3, help="expert servers (default 3)")
    ap.add_argument("--preset", default="tiny-v3", help="make-model preset (default tiny-v3)")
    ap.add_argument("--slots-per-server", type=int, default=0,
                    help="routed experts per server and layer (default: all of them, so every "
                         "expert has a replica on every live server); servers x slots must be "
                         ">= 2 x experts")
    ap.add_argument("--server-lost-after-s", type=float, default=5,
                    help="router: a killed server's slots move after this long (default 5)")
    ap.add_argument("--restart-delay-s", type=float, default=None,
                    help="restart a killed server after this many seconds without waiting for "
                         "the controller to move its slots (as Kubernetes restarts a crashed "
                         "pod at its address); default: wait until its slots moved")
    ap.add_argument("--restart-timeout-s", type=float, default=60,
                    help="longest wait for the controller to drop / re-add a server (default 60)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per process (default 1)")
    ap.add_argument("--dtype", default="bf16", help="router and expert dtype (default bf16)")
    ap.add_argument("--rss-every", type=float, default=5, help="RSS sampling period, s (default 5)")
    ap.add_argument("--warmup-s", type=float, default=None,
                    help="RSS baseline time (default: max(10%% of the run, 2 min), at most half)")
    ap.add_argument("--rss-growth-limit", type=float, default=5.0,
                    help="PASS needs RSS growth after warm-up below this %% (default 5)")
    ap.add_argument("--request-timeout-s", type=float, default=120)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bin-dir", default="build/bin")
    ap.add_argument("--work-dir", default=None, help="logs and model (default: a new temp dir)")
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args()

    if args.kill_among is None:
        args.kill_among = max(1, args.servers - 1)
    if not 1 <= args.kill_among <= args.servers:
        ap.error("--kill-among must be in [1, --servers]")
    duration = args.minutes * 60
    warmup = args.warmup_s if args.warmup_s is not None else min(max(0.1 * duration, 120), 0.5 * duration)
    work = args.work_dir or tempfile.mkdtemp(prefix="dmoe-soak-")
    os.makedirs(work, exist_ok=True)
    for b in ("dmoe", "dmoe-expert", "dmoe-router", "dmoe-gateway"):
        if not os.access(os.path.join(args.bin_dir, b), os.X_OK):
            print("soak: %s/%s not found (build it, or pass --bin-dir)" % (args.bin_dir, b), file=sys.stderr)
            return 2
    print("soak: logs, model and port files in %s" % work, flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    cluster = Cluster(args, work)
    stop = threading.Event()
    results, gaps = [], []
    rss = {}          # role -> [(t, pid, kb)]
    restarted = set()  # roles restarted by the kill loop
    kills = []
    crashes = []
    notes = []
    reconnects = [0]
    interrupted = False
    t_start = None
    try:
        cluster.make_model()
        cluster.start()
        print("soak: %d expert servers x %d slots (%d experts, %d MoE layers), router 127.0.0.1:%d, "
              "gateway 127.0.0.1:%d; %d clients for %.1f min, kill every %s s (servers 0-%d), "
              "warm-up %.0f s"
              % (args.servers, cluster.slots, cluster.num_experts, len(cluster.moe_layers),
                 cluster.router.port, cluster.gateway.port, args.clients, args.minutes,
                 args.kill_every or "never", args.kill_among - 1, warmup), flush=True)
        t_start = now()
        deadline = t_start + duration

        def client_loop(i):
            rng = random.Random(args.seed * 1000 + i)
            c = Client(cluster.gateway.port, args.request_timeout_s)
            while not stop.is_set() and now() < deadline:
                res, body = run_one(c, rng, gaps)
                res["t0"] -= t_start
                res["t1"] -= t_start
                if not res["ok"] and not res["disconnect"]:
                    res["request"] = body
                results.append(res)
            c.close()
            reconnects[0] += c.reconnects

        def sampler():
            while not stop.is_set():
                t = now() - t_start
                for p in cluster.procs():
                    if p.alive():
                        st = read_status(p.popen.pid)
                        if st:
                            rss.setdefault(p.role, []).append((t, p.popen.pid) + st)
                    elif not p.expected_exit and p.popen.returncode is not None:
                        p.expected_exit = True
                        crashes.append({"role": p.role, "t": round(t, 1),
                                        "exit": p.popen.returncode, "log": p.log})
                        print("soak: %s exited on its own (%s) at %.0f s; see %s"
                              % (p.role, p.popen.returncode, t, p.log), flush=True)
                stop.wait(args.rss_every)

        def killer():
            k = 0
            while args.kill_every > 0:
                t_kill = t_start + (k + 1) * args.kill_every
                if t_kill > deadline - 5 or stop.wait(max(0, t_kill - now())):
                    return
                idx = k % args.kill_among
                k += 1
                p = cluster.experts[idx]
                ev = {"server": idx, "port": p.port, "t_kill": round(now() - t_start, 1)}
                kills.append(ev)
                p.expected_exit = True
                p.signal(signal.SIGKILL)
                p.popen.wait()
                print("soak: t=%5.0f s  SIGKILL expert-%d (127.0.0.1:%d)" % (ev["t_kill"], idx, p.port),
                      flush=True)
                try:
                    if args.restart_delay_s is None:
                        end = now() + args.server_lost_after_s + args.restart_timeout_s
                        while cluster.slots_of(idx) > 0:
                            if now() > end or stop.is_set():
                                raise RuntimeError("the controller did not move the slots of expert-%d" % idx)
                            time.sleep(0.5)
                        ev["t_slots_moved"] = round(now() - t_start, 1)
                    else:
                        # As Kubernetes restarts a crashed pod: at once, before the
                        # controller finds the server lost; it must reload its slots.
                        _, version_before = cluster.min_replicas()
                        stop.wait(args.restart_delay_s)
                        ev["t_slots_moved"] = None
                    with cluster.lock:
                        q = cluster._proc("expert-%d" % idx, cluster.expert_argv(
                            idx, join="127.0.0.1:%d" % cluster.router.port, port=p.port))
                        q.start()
                        cluster.experts[idx] = q
                    restarted.add(q.role)
                    q.wait_port(60)
                    ev["t_restart"] = round(now() - t_start, 1)
                    end = now() + args.restart_timeout_s
                    while cluster.slots_of(idx) == 0 or (
                            args.restart_delay_s is not None
                            and cluster.min_replicas()[1] == version_before):
                        if now() > end or stop.is_set():
                            raise RuntimeError("expert-%d did not get slots back after --join" % idx)
                        time.sleep(0.5)
                    ev["t_joined"] = round(now() - t_start, 1)
                    m, version = cluster.min_replicas()
                    ev["min_replicas"], ev["placement_version"] = m, version
                    ev["ok"] = m is not None and m >= 2
                    moved = ("slots moved at %.0f s" % ev["t_slots_moved"]
                             if ev["t_slots_moved"] is not None else "no wait for the controller")
                    print("soak: t=%5.0f s  expert-%d %s, restarted at %.0f s, "
                          "holds slots again at %.0f s (placement v%s, min replicas %s)"
                          % (now() - t_start, idx, moved, ev["t_restart"],
                             ev["t_joined"], version, m), flush=True)
                except Exception as e:  # recorded; the run goes on
                    ev["ok"] = False
                    ev["error"] = str(e)
                    print("soak: kill %d: %s" % (k, e), flush=True)

        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
        threads += [threading.Thread(target=sampler, daemon=True),
                    threading.Thread(target=killer, daemon=True)]
        for t in threads:
            t.start()
        last_print = now()
        while now() < deadline:
            time.sleep(1)
            if now() - last_print >= 30:
                last_print = now()
                done = len(results)
                bad = sum(1 for r in results if not r["ok"] and not r["disconnect"])
                print("soak: t=%5.0f s  %d requests, %d failed" % (now() - t_start, done, bad), flush=True)
            if any(c["role"] in ("gateway", "router") for c in crashes):
                notes.append("stopped early: gateway or router exited")
                break
        stop.set()
        for t in threads[:args.clients]:
            t.join(args.request_timeout_s + 5)
        # One last RSS sample at the end of traffic.
        t = now() - t_start
        for p in cluster.procs():
            if p.alive():
                st = read_status(p.popen.pid)
                if st:
                    rss.setdefault(p.role, []).append((t, p.popen.pid) + st)
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted")
        print("\nsoak: interrupted; stopping the cluster", flush=True)
    except Exception as e:
        print("soak: error: %s" % e, file=sys.stderr, flush=True)
        stop.set()
        cluster.stop()
        print("soak: logs in %s" % work)
        return 2
    finally:
        stop.set()
        cluster.stop()
    elapsed = (now() - t_start) if t_start else 0
    report = build_report(args, cluster, work, elapsed, warmup, results, gaps, rss, restarted,
                          kills, crashes, notes, reconnects[0], interrupted)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print("soak: report written to %s" % args.json)
    print("soak: logs in %s" % work)
    return 0 if report["pass"] else 1


def build_report(args, cluster, work, elapsed, warmup, results, gaps, rss, restarted, kills,
                 crashes, notes, reconnects, interrupted):
    ok = [r for r in results if r["ok"]]
    disc = [r for r in results if r["disconnect"]]
    failed = [r for r in results if not r["ok"] and not r["disconnect"]]
    by_kind = {}
    for r in results:
        k = by_kind.setdefault(r["kind"], {"ok": 0, "disconnected": 0, "failed": {}})
        if r["ok"]:
            k["ok"] += 1
        elif r["disconnect"]:
            k["disconnected"] += 1
        else:
            key = str(r["status"] or "no-response")
            k["failed"][key] = k["failed"].get(key, 0) + 1
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    procs = {}
    for role, samples in sorted(rss.items()):
        warm = next((s for s in samples if s[0] >= warmup), None)
        end = samples[-1]
        entry = {"restarted": role in restarted, "pids": sorted({s[1] for s in samples}),
                 "samples": len(samples), "max_kb": max(s[2] for s in samples), "end_kb": end[2],
                 "warm_kb": None, "growth_pct": None, "gated": False}
        # Growth within one incarnation: the baseline is the warm-up sample, or
        # for a restarted server the first sample of its last incarnation after warm-up.
        last_pid = end[1]
        if warm is not None and warm[1] != last_pid:
            warm = next((s for s in samples if s[1] == last_pid and s[0] >= warmup), None)
        if warm is not None and warm is not end:
            entry["warm_kb"] = warm[2]
            entry["warm_t"] = round(warm[0], 1)
            entry["growth_pct"] = round(100.0 * (end[2] - warm[2]) / warm[2], 2)
            entry["anon_warm_kb"], entry["anon_end_kb"] = warm[3], end[3]
            entry["threads_warm"], entry["threads_end"] = warm[4], end[4]
            entry["gated"] = role not in restarted
            # Growth over the second half of the measured window: a leak keeps
            # growing there, allocator warm-up (caches filling) has levelled off.
            mid_t = warm[0] + 0.5 * (end[0] - warm[0])
            mid = next((s for s in samples if s[1] == last_pid and s[0] >= mid_t), None)
            if mid is not None and mid is not end:
                entry["mid_kb"], entry["mid_t"] = mid[2], round(mid[0], 1)
                entry["second_half_growth_pct"] = round(100.0 * (end[2] - mid[2]) / mid[2], 2)
        # The series, thinned to at most ~120 points, for plotting / inspection.
        step = max(1, len(samples) // 120)
        entry["series"] = [[round(x[0], 1), x[2], x[3], x[4]] for x in samples[::step]]
        entry["series_columns"] = ["t_s", "rss_kb", "rss_anon_kb", "threads"]
        procs[role] = entry
    reasons = []
    if failed:
        reasons.append("%d failed requests" % len(failed))
    if crashes:
        reasons.append("%d processes exited on their own" % len(crashes))
    bad_kills = [k for k in kills if not k.get("ok")]
    if bad_kills:
        reasons.append("%d kills without a clean rejoin with >= 2 replicas" % len(bad_kills))
    for role, e in procs.items():
        if e["gated"] and e["growth_pct"] >= args.rss_growth_limit:
            reasons.append("%s RSS grew %.1f%% after warm-up" % (role, e["growth_pct"]))
    for role in ("gateway", "router"):
        if role not in procs or procs[role]["growth_pct"] is None:
            reasons.append("no RSS growth measured for %s (run too short?)" % role)
    if interrupted:
        reasons.append("interrupted")
    if not results:
        reasons.append("no requests")
    # Lines worth a look in the logs.
    log_hits = {}
    patterns = ("could not move", "already counts this server", "Sanitizer", "terminate called",
                "Segmentation", "Aborted", "giving up")
    for name in sorted(os.listdir(work)):
        if name.endswith(".log"):
            try:
                with open(os.path.join(work, name), errors="replace") as f:
                    for line in f:
                        if any(p in line for p in patterns):
                            log_hits.setdefault(name, []).append(line.strip()[:300])
            except OSError:
                pass
    return {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items()},
        "servers": args.servers, "slots_per_server": getattr(cluster, "slots", None),
        "experts": getattr(cluster, "num_experts", None), "work_dir": work,
        "elapsed_s": round(elapsed, 1), "warmup_s": round(warmup, 1),
        "requests": {"total": len(results), "ok": len(ok), "failed": len(failed),
                     "client_disconnects": len(disc), "by_kind": by_kind,
                     "keepalive_reconnects": reconnects},
        "failures": [{"t": round(r["t0"], 1), "kind": r["kind"], "status": r["status"],
                      "error": r["error"], "request": r.get("request")} for r in failed[:20]],
        "throughput": {"requests_per_s": round(len(results) / elapsed, 2) if elapsed else 0,
                       "tokens_per_s": round(tokens / elapsed, 1) if elapsed else 0,
                       "tokens": tokens},
        "ttft_ms": percentiles(ttft),
        "inter_token_gap_ms": percentiles(gaps),
        "rss": procs,
        "kills": kills,
        "crashes": crashes,
        "log_lines": {k: v[:10] for k, v in log_hits.items()},
        "notes": notes,
        "pass": not reasons,
        "fail_reasons": reasons,
    }


def print_report(r):
    rq = r["requests"]
    print("\n=== dmoe soak: %.0f s, %d expert servers x %s slots, %d clients ===" %
          (r["elapsed_s"], r["servers"], r["slots_per_server"], r["config"]["clients"]))
    print("requests: %d total, %d ok, %d failed, %d client disconnects (excluded), "
          "%d keep-alive reconnects" % (rq["total"], rq["ok"], rq["failed"], rq["client_disconnects"],
                                        rq["keepalive_reconnects"]))
    print("%-20s %7s %7s  %s" % ("kind", "ok", "discon", "failed by status"))
    for kind, k in sorted(rq["by_kind"].items()):
        print("%-20s %7d %7d  %s" % (kind, k["ok"], k["disconnected"],
                                     ", ".join("%s: %d" % kv for kv in sorted(k["failed"].items())) or "-"))
    th = r["throughput"]
    print("throughput: %.2f requests/s, %.1f tokens/s (%d tokens)" %
          (th["requests_per_s"], th["tokens_per_s"], th["tokens"]))
    for name, key in (("TTFT (stream)", "ttft_ms"), ("inter-token gap", "inter_token_gap_ms")):
        p = r[key]
        if p:
            print("%-16s ms: p50 %7.1f  p90 %7.1f  p99 %7.1f  max %7.1f  (n=%d)" %
                  (name, p["p50"], p["p90"], p["p99"], p["max"], p["n"]))
    print("RSS (MiB)        warm-up     end     max  growth  2nd half  threads  gated")
    for role, e in r["rss"].items():
        w = "%8.1f" % (e["warm_kb"] / 1024) if e["warm_kb"] else "       -"
        g = "%6.2f%%" % e["growth_pct"] if e["growth_pct"] is not None else "      -"
        h = e.get("second_half_growth_pct")
        h = "%7.2f%%" % h if h is not None else "       -"
        th = "%3s->%-3s" % (e.get("threads_warm", "-"), e.get("threads_end", "-"))
        print("%-14s %s %7.1f %7.1f %s %s  %s  %s%s" % (role, w, e["end_kb"] / 1024, e["max_kb"] / 1024, g, h, th,
                                                "yes" if e["gated"] else "no",
                                                " (restarted)" if e["restarted"] else ""))
    ok_kills = sum(1 for k in r["kills"] if k.get("ok"))
    print("kills: %d, rejoined with >= 2 replicas: %d" % (len(r["kills"]), ok_kills))
    for k in r["kills"]:
        if not k.get("ok"):
            print("  kill of expert-%d at %s s: %s" % (k["server"], k["t_kill"], k.get("error", k)))
    for c in r["crashes"]:
        print("exited on its own: %s (exit %s at %s s), log %s" % (c["role"], c["exit"], c["t"], c["log"]))
    for f in r["failures"]:
        print("FAILED t=%s s %s status %s: %s\n    request %s" %
              (f["t"], f["kind"], f["status"], (f["error"] or "")[:400], json.dumps(f["request"])[:300]))
    for name, lines in r["log_lines"].items():
        print("log %s:" % name)
        for line in lines:
            print("    " + line)
    print("%s%s" % ("PASS" if r["pass"] else "FAIL",
                    "" if r["pass"] else ": " + "; ".join(r["fail_reasons"])))


if __name__ == "__main__":
    sys.exit(main())
