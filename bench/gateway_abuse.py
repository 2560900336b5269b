"""The coordinator's gateway under abuse: an honest round alone and while it is attacked.

Provisions a PKI, starts ``flower-server`` (TLS, node authentication, DP) and two
``flower-client``s on 127.0.0.1 and runs one round of a small federation twice: alone,
and while unauthenticated peers on 127.0.0.1 send oversized bodies (400 MB announced,
a few MB sent), slow bodies (one byte a second) and waves of 200 concurrent unsigned
requests — each kind bounded in count and time. Records the run's wall time, whether
it completed, and the peak resident memory of the gateway and of the SuperLink against
their idle value (target: the honest round completes and peak RSS stays within 2× of
idle). Writes ``bench/results/gateway_abuse.json``.

    .venv/bin/python bench/gateway_abuse.py [--examples 200] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchlib import markdown, write, write_csv

from fedsilo.common.processes import BIN, child_env, free_port, stop_group
from fedsilo.common.records import load_records
from fedsilo.common.splits import take
from fedsilo.server.provision import provision

NAMES = ("hospital-a", "hospital-b")
RSS_LIMIT = 2.0  # peak over idle


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _find(server: subprocess.Popen, needle: str) -> int | None:
    """The pid of the descendant of ``server`` whose command line has ``needle``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo = list(children.get(server.pid, []))
    while todo:
        pid = todo.pop()
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace"):
                return pid
        except OSError:
            continue
        todo += children.get(pid, [])
    return None


class Attack:
    """Unauthenticated abuse of the public port until :meth:`stop` (bounded)."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port, self.deadline = port, time.monotonic() + seconds
        self.context = ssl.create_default_context()
        self.context.check_hostname, self.context.verify_mode = False, ssl.CERT_NONE
        self.counts = {"oversized": 0, "slow": 0, "unsigned": 0}
        self.answers: dict[str, int] = {}
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._oversized, self._slow, self._waves)]

    def _connect(self) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        return self.context.wrap_socket(raw, server_hostname="localhost")

    def _post(self, length: int, body: bytes = b"", pace: float = 0.0) -> None:
        try:
            with self._connect() as sock:
                sock.sendall((f"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\n"
                              f"content-length: {length}\r\n\r\n").encode())
                if pace:
                    for _ in range(length):
                        if self._stop.is_set():
                            break
                        sock.sendall(b"x")
                        time.sleep(pace)
                else:
                    sock.sendall(body)
                head = sock.recv(64)
            key = head.split(b" ", 2)[1].decode() if head else "closed"
        except OSError:
            key = "closed"
        self.answers[key] = self.answers.get(key, 0) + 1

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def _oversized(self) -> None:
        while self._running() and self.counts["oversized"] < 50:
            self.counts["oversized"] += 1
            self._post(400 << 20, b"\0" * (4 << 20))

    def _slow(self) -> None:
        with ThreadPoolExecutor(10) as pool:
            while self._running() and self.counts["slow"] < 100:
                self.counts["slow"] += 10
                list(pool.map(lambda _: self._post(1000, pace=1.0), range(10)))

    def _waves(self) -> None:
        with ThreadPoolExecutor(200) as pool:
            while self._running() and self.counts["unsigned"] < 2000:
                self.counts["unsigned"] += 200
                list(pool.map(lambda _: self._post(100, b"x" * 100), range(200)))
                time.sleep(1.0)

    def start(self) -> None:
        """Start the three kinds of abuse."""
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Stop and wait for the attackers."""
        self._stop.set()
        for thread in self.threads:
            thread.join(60)


def run(root: Path, args: argparse.Namespace, abuse: bool) -> dict[str, Any]:
    """One honest round, alone or under abuse; wall time and peak RSS."""
    port = free_port()
    pki = provision(root / "pki", ["localhost"], list(NAMES), port=port, generate_keys=True)
    icd = load_records("icd10")
    data = {}
    for j, name in enumerate(NAMES):
        data[name] = root / f"{name}.csv"
        picked = list(range(j, len(icd), 100))[:args.examples]
        write_csv(data[name], take(icd, picked))
    flags = ["--num-rounds", "1", "--model", args.model]
    agreement = root / "agreement.json"
    subprocess.run([str(BIN / "flower-server"), "agreement", "--pki", str(root / "pki"),
                    "--name", "bench", "--out", str(agreement), *flags], check=True)
    for n in NAMES:
        subprocess.run([str(BIN / "flower-client"), "approve", str(agreement), "--config",
                        str(pki.kits[n] / "client.toml"), "--yes"], check=True,
                       stdin=subprocess.DEVNULL)
    log = (root / "server.log").open("wb")
    started = time.monotonic()
    server = subprocess.Popen(
        [str(BIN / "flower-server"), "--pki", str(root / "pki"), "--state-dir",
         str(root / "state"), "--host", "127.0.0.1", "--port", str(port), *flags,
         "--agreement", str(agreement), "--min-available", "2", "--min-train", "2",
         "--output-dir", str(root / "out")], env=child_env(), stdout=log,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    clients, attack = [], None
    try:
        while "waiting for" not in (root / "server.log").read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() - started > 300:
                raise SystemExit(f"flower-server did not start; see {root / 'server.log'}")
            time.sleep(0.5)
        pids = {"gateway": _find(server, "fedsilo.server.gateway"),
                "superlink": _find(server, "flower-superlink")}
        idle = {k: _rss(p) for k, p in pids.items() if p}
        peak = dict(idle)
        if abuse:
            attack = Attack(port, args.timeout)
            attack.start()
        clients = [subprocess.Popen(
            [str(BIN / "flower-client"), "--config", str(pki.kits[n] / "client.toml"),
             "--data", str(data[n])], env=child_env(OMP_NUM_THREADS="1"),
            stdout=(root / f"{n}.log").open("wb"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True) for n in NAMES]
        while server.poll() is None and time.monotonic() - started < args.timeout:
            for key, pid in pids.items():
                if pid:
                    peak[key] = max(peak[key], _rss(pid))
            time.sleep(0.5)
        code = server.poll()
    finally:
        if attack is not None:
            attack.stop()
        for proc in (*clients, server):
            stop_group(proc)
        log.close()
    return {"abuse": abuse, "completed": code == 0, "wall_seconds": time.monotonic() - started,
            "idle_rss_bytes": idle, "peak_rss_bytes": peak,
            "peak_over_idle": {k: peak[k] / idle[k] for k in idle if idle[k]},
            "attack": None if attack is None else {"sent": attack.counts,
                                                   "answers": attack.answers}}


def main() -> None:
    """Measure and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="rows per institution")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = []
    for abuse in (False, True):
        logging.info("honest round, %s", "under abuse" if abuse else "alone")
        if args.workdir:
            folder = (args.workdir / ("abuse" if abuse else "alone")).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            runs.append(run(folder, args, abuse))
        else:
            with tempfile.TemporaryDirectory(prefix="fedsilo-abuse-") as tmp:
                runs.append(run(Path(tmp), args, abuse))
    met = all(r["completed"] and all(v <= RSS_LIMIT for v in r["peak_over_idle"].values())
              for r in runs)
    rows = [["under abuse" if r["abuse"] else "alone", r["completed"],
             f"{r['wall_seconds']:.1f}",
             *(f"{r['peak_over_idle'].get(k, float('nan')):.2f}" for k in ("gateway",
                                                                          "superlink"))]
            for r in runs]
    table = markdown(["run", "completed", "wall s", "gateway peak/idle RSS",
                      "SuperLink peak/idle RSS"], rows)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write("gateway_abuse", {"settings": settings, "runs": runs,
                                   "target": {"peak_over_idle_limit": RSS_LIMIT, "met": met}},
                 table)
    print(table)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
