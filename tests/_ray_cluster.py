"""A two-node Ray cluster on loopback, inside a network namespace of its own (tests only).

The namespace has only ``lo``, so both nodes register as 127.0.0.1 and nothing outside
the namespace can reach them (or is reached by them); the ports are fixed because the
namespace is fresh and ours alone.  Token authentication is on: a fresh random token in a
temporary HOME, read by every process through ``RAY_AUTH_TOKEN_PATH`` (never on a command
line, never the real ``~/.ray``).

Everything started here is stopped by process id: the two ``ray start --block`` processes
(each in its own process group) are sent SIGTERM, then every process left in the namespace
(``ip netns pids``) and in those process groups is killed, and the namespace is deleted.

Run as a script (inside the namespace) this file is the probe that asks the cluster, over
its dashboard, for its nodes, the actors of a class and a job's status, printing JSON.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

GCS_PORT = 6379
DASHBOARD_PORT = 8265
# every other port of both nodes fixed and distinct (two raylets share one address)
_NODE_PORTS = {
    "head": {"--node-manager-port": 20001, "--object-manager-port": 20002, "--dashboard-agent-listen-port": 20003,
             "--dashboard-agent-grpc-port": 20004, "--runtime-env-agent-port": 20005,
             "--metrics-export-port": 20006, "--min-worker-port": 21000, "--max-worker-port": 21099},
    "worker": {"--node-manager-port": 20011, "--object-manager-port": 20012, "--dashboard-agent-listen-port": 20013,
               "--dashboard-agent-grpc-port": 20014, "--runtime-env-agent-port": 20015,
               "--metrics-export-port": 20016, "--min-worker-port": 21100, "--max-worker-port": 21199},
}
OBJECT_STORE_BYTES = 100 * 1024 * 1024


class NamespaceUnavailable(RuntimeError):
    """``ip netns add`` failed: no network namespaces here (not root, no CAP_SYS_ADMIN, no iproute2)."""


def _run(cmd, timeout=30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


class LoopbackCluster:
    """Head + one worker node, ``num_cpus`` each, in a fresh network namespace."""

    def __init__(self, num_cpus: int = 1):
        self.num_cpus = num_cpus
        self.name = f"udray-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.root = Path(tempfile.mkdtemp(prefix="udrc", dir="/tmp"))  # short: Ray's socket paths sit under it
        self.home = self.root / "home"
        self.temp_dir = self.root / "ray"
        self.procs: dict[str, subprocess.Popen] = {}
        self._pgids: set[int] = set()
        self._netns = False
        self._logs: list = []
        self.dashboard = f"http://127.0.0.1:{DASHBOARD_PORT}"
        self.gcs = f"127.0.0.1:{GCS_PORT}"

    # ------------------------------------------------------------------ environment
    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # an embedded RayExecutor earlier in this process sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
        # which would refuse the second node: no RAY_* variable of ours leaks in
        bindir = str(Path(sys.executable).parent)
        env.update(
            HOME=str(self.home),
            PATH=bindir + os.pathsep + env.get("PATH", ""),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.home / ".ray" / "auth_token"),
            RAY_USAGE_STATS_ENABLED="0",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def netns_cmd(self, *args) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(str, args)]

    def run(self, *args, timeout=60) -> subprocess.CompletedProcess:
        """A command inside the namespace with the cluster's environment; waits for it."""
        return _run(self.netns_cmd(*args), timeout=timeout, env=self._env(), cwd=self.root)

    # ------------------------------------------------------------------ lifecycle
    def create_namespace(self) -> None:
        try:
            r = _run(["ip", "netns", "add", self.name])
        except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
            raise NamespaceUnavailable(f"`ip netns add` could not run: {exc}") from None
        if r.returncode != 0:
            raise NamespaceUnavailable(f"`ip netns add {self.name}` failed (exit {r.returncode}): "
                                       f"{(r.stderr or r.stdout).strip()}")
        self._netns = True
        r = _run(self.netns_cmd("ip", "link", "set", "lo", "up"))
        if r.returncode != 0:
            raise NamespaceUnavailable(f"`ip link set lo up` in namespace {self.name} failed: {r.stderr.strip()}")

    def _write_token(self) -> None:
        d = self.home / ".ray"
        d.mkdir(parents=True)
        path = d / "auth_token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))

    def _start_node(self, role: str, extra: list[str]) -> None:
        ray = str(Path(sys.executable).parent / "ray")
        ports = [f"{k}={v}" for k, v in _NODE_PORTS[role].items()]
        cmd = self.netns_cmd(ray, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}",
                             "--num-gpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
                             *ports, *extra)
        log = open(self.root / f"{role}.log", "w")
        self._logs.append(log)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self._env(), cwd=self.root, start_new_session=True)
        self.procs[role] = proc
        self._pgids.add(proc.pid)  # start_new_session: its own process group, pgid == pid

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for role, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"ray start ({role}) exited with {p.returncode} while waiting for {what}:\n"
                                       + self.log_tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n" + self.log_tail())
            time.sleep(0.5)

    def start(self, timeout: float = 60) -> "LoopbackCluster":
        self.create_namespace()
        self._write_token()
        self.temp_dir.mkdir()
        self._start_node("head", ["--head", f"--port={GCS_PORT}", "--include-dashboard=true",
                                  "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
                                  f"--temp-dir={self.temp_dir}"])
        # written by `ray start --head` once the GCS and the head's raylet are up
        self._wait("the head node", lambda: (self.temp_dir / "ray_current_cluster").exists(), timeout)
        self._start_node("worker", [f"--address={self.gcs}"])
        info = self.probe("--wait-nodes", "2", "--timeout", str(timeout), timeout=timeout + 30)
        self.nodes = info["nodes"]
        return self

    def probe(self, *args, timeout=60) -> dict:
        r = self.run(sys.executable, __file__, "--address", self.dashboard, *args, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"cluster probe {args} failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}\n"
                               + self.log_tail())
        return json.loads(r.stdout.strip().splitlines()[-1])

    def submit(self, working_dir, *entrypoint, submission_id: str, timeout=120) -> subprocess.CompletedProcess:
        """``ray job submit`` (waits for the job and prints its log)."""
        ray = str(Path(sys.executable).parent / "ray")
        return self.run(ray, "job", "submit", "--address", self.dashboard, "--working-dir", working_dir,
                        "--submission-id", submission_id, "--", *entrypoint, timeout=timeout)

    def log_tail(self, n: int = 40) -> str:
        out = []
        for role in ("head", "worker"):
            p = self.root / f"{role}.log"
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- ray start ({role}) ---\n" + "\n".join(lines))
        return "\n".join(out)

    def _netns_pids(self) -> set[int]:
        if not self._netns:
            return set()
        r = _run(["ip", "netns", "pids", self.name])
        return {int(x) for x in r.stdout.split()} if r.returncode == 0 else set()

    def _group_pids(self) -> set[int]:
        import psutil

        pids = set()
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) in self._pgids:
                    pids.add(p.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        return pids

    def stop(self) -> None:
        """Stop everything started here, by process id, and delete the namespace."""
        try:
            # ray start --block: SIGTERM makes it stop the processes of its node (worker first)
            for role in ("worker", "head"):
                p = self.procs.get(role)
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        pass
            # whatever is left: in the namespace or in the two process groups
            for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
                left = (self._netns_pids() | self._group_pids()) - {os.getpid()}
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + pause
                while time.monotonic() < deadline and (self._netns_pids() | self._group_pids()) - {os.getpid()}:
                    time.sleep(0.1)
            for p in self.procs.values():
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for log in self._logs:
                log.close()
            if self._netns:
                r = _run(["ip", "netns", "delete", self.name])
                if r.returncode == 0:
                    self._netns = False
            shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------- the probe (run in the namespace)
def _probe(argv) -> dict:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--wait-nodes", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--actors", default=None, help="class name of the actors to list")
    ap.add_argument("--job", default=None, help="submission id whose status to report")
    a = ap.parse_args(argv)
    from ray.util.state import list_actors, list_nodes

    deadline = time.monotonic() + a.timeout
    while True:
        try:
            nodes = [{"node_id": n.node_id, "node_ip": n.node_ip, "state": n.state, "is_head": n.is_head_node}
                     for n in list_nodes(address=a.address, raise_on_missing_output=False)]
        except Exception as exc:  # noqa: BLE001 - the dashboard is still starting
            nodes, error = [], repr(exc)
        else:
            error = None
        if sum(n["state"] == "ALIVE" for n in nodes) >= a.wait_nodes:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(nodes)} nodes after {a.timeout}s (wanted {a.wait_nodes} alive): {nodes} {error}")
        time.sleep(0.5)
    out = {"nodes": nodes}
    if a.actors:
        out["actors"] = [{"actor_id": x.actor_id, "node_id": x.node_id, "state": x.state, "pid": x.pid}
                         for x in list_actors(address=a.address, filters=[("class_name", "=", a.actors)],
                                              detail=True, raise_on_missing_output=False)]
    if a.job:
        from ray.job_submission import JobSubmissionClient

        info = JobSubmissionClient(a.address).get_job_info(a.job)
        out["job"] = {"status": getattr(info.status, "value", str(info.status)), "message": info.message}
    return out


if __name__ == "__main__":
    print(json.dumps(_probe(sys.argv[1:])))
