"""Real Ray clusters for tests, on loopback only: a head and worker nodes started with
`ray start` (each its own temp dir), the processes of each found by that temp dir, their TCP
sockets read from `ss`, and every process killed by pid at the end (never `ray stop`, which
would stop every Ray on the machine).

Ray advertises the machine's interface address even for a head started with
``--node-ip-address 127.0.0.1``; with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray 2.60 resolves
its own node address to loopback, so every socket stays on 127.0.0.1 (checked, not assumed). Ray
reads it when it is imported: this module sets it on import, before any test imports Ray. Worker
nodes start through tests/ray_start_loopback.py (`ray start` with its Windows/OSX guard lifted).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported anywhere in this process
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no cloud-metadata probes or usage reports from any Ray we start

RAY = str(Path(sys.executable).parent / "ray")
RAY_START_LOOPBACK = [sys.executable, str(Path(__file__).with_name("ray_start_loopback.py"))]
LOOPBACK = ("127.", "::1", "::ffff:127.", "[::1]", "[::ffff:127.")


def short_tmp() -> Path:
    """A short temp dir: Ray's Unix socket paths under it must stay below 107 characters."""
    return Path(tempfile.mkdtemp(prefix="ca-ray-", dir="/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_resolves_loopback() -> bool:
    """Whether Ray, as imported in this process, resolves its node address to loopback."""
    import ray._private.ray_constants as ray_constants

    return not ray_constants.ENABLE_RAY_CLUSTER


def loopback_vars(tmp: Path) -> dict:
    """Environment for Ray processes of a test: loopback node address, no usage stats, the head's
    cloud-metadata probe sent to a closed loopback port (engines/ray_connect.no_cloud_probe_env),
    and a token file of its own (Ray would otherwise create ~/.ray/auth_token)."""
    token = tmp / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
    from carlos_audit.engines.ray_connect import no_cloud_probe_env

    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_TOKEN_PATH": str(token)} | no_cloud_probe_env()


@contextlib.contextmanager
def loopback_env(tmp: Path, **extra):
    """Set loopback_vars (and ``extra``) in this process, restored afterwards (RAY_AUTH_MODE too,
    which the driver may turn on). Ray's cached auth settings and token are reloaded on entry, as
    init_ray does: a Ray started here with ``ray.init`` then uses this token, not one cached before."""
    from carlos_audit.engines.ray_connect import environ_set, refresh_ray_auth

    with environ_set(loopback_vars(tmp) | extra, also_restore=("RAY_AUTH_MODE",)) as new:
        refresh_ray_auth()
        yield new


def _procs() -> dict[int, tuple[int, str]]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def pids_of(tmp: Path) -> set[int]:
    """Processes whose command line names ``tmp`` (gcs_server, raylet, monitors...) and their
    descendants (workers, agents)."""
    procs = _procs()
    pids = {p for p, (_, cmd) in procs.items() if str(tmp) in cmd and p != os.getpid()}
    grew = True
    while grew:
        kids = {p for p, (pp, _) in procs.items() if pp in pids} - pids
        grew = bool(kids)
        pids |= kids
    return pids


def kill(tmp: Path) -> set[int]:
    """SIGKILL every process of the Ray node(s) under ``tmp``; returns their pids."""
    pids = pids_of(tmp)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return pids


def _loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0]
    return host.startswith(LOOPBACK) or host in ("*", "0.0.0.0") and addr.endswith(":*")


def ray_sockets(tmp: Path, extra_pids=()) -> dict:
    """TCP sockets (listening and connected) of the Ray processes under ``tmp`` (and
    ``extra_pids``, e.g. the driver): {"listening": [...], "connected": [...], "non_loopback": [...]}."""
    pids = pids_of(tmp) | set(extra_pids)
    out = subprocess.run(["ss", "-Htanp"], capture_output=True, text=True, check=True).stdout
    res = {"listening": [], "connected": [], "non_loopback": []}
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if not owners & pids:
            continue
        f = line.split()
        state, local, peer = f[0], f[3], f[4]
        kind = "listening" if state == "LISTEN" else "connected"
        res[kind].append(f"{local} -> {peer}")
        if not _loopback(local) or (kind == "connected" and not _loopback(peer)):
            res["non_loopback"].append(line)
    return res


class Cluster:
    """A head (no CPUs: tasks run on the workers) and worker nodes, each `ray start`ed with its
    own temp dir and environment (``CARLOS_AUDIT_HOME`` per node: nothing shared with the driver)."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, Path] = {}

    def _start(self, name: str, args: list[str], node_env: dict, cli=(RAY,)) -> Path:
        tmp = self.root / name
        tmp.mkdir(parents=True, exist_ok=True)
        self.nodes[name] = tmp
        env = dict(os.environ) | loopback_vars(self.root) | self.env | node_env
        r = subprocess.run([*cli, "start", "--node-ip-address", "127.0.0.1", "--temp-dir", str(tmp / "ray"),
                            "--disable-usage-stats", *args], env=env, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"ray start {name} failed: {r.stderr[-2000:]}")
        return tmp

    def start_head(self) -> None:
        self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard", "false",
                             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                             "--metrics-export-port", str(free_port())], {})

    def start_worker(self, name: str, node_env: dict) -> Path:
        return self._start(name, ["--address", self.address, "--num-cpus", "1",
                                   "--dashboard-agent-listen-port", str(free_port()),
                                   "--metrics-export-port", str(free_port())], node_env, cli=RAY_START_LOOPBACK)

    def kill_node(self, name: str) -> set[int]:
        return kill(self.nodes[name])

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            kill(self.nodes[name])
        # the head's Ray client server detaches and its command line names the GCS address, not a temp dir
        for p, (_, cmd) in _procs().items():
            if "ray.util.client.server" in cmd and f"--address={self.address}" in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
