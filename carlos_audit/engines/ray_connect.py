"""Joining a Ray cluster the way users start it (``ray start --head``), or starting one here.

``ray.init(address=...)`` against a cluster it cannot use retries for 20 s to more than a minute
and ends in a traceback. Before calling it, ``connect`` checks the address in a few seconds and
turns each failure into one line that names the address and the likely cause:

- unreachable: a TCP connection to host:port is refused or times out;
- authentication: Ray 2.5x+ token authentication (``RAY_AUTH_MODE=token``). A head started with
  ``ray start`` enables it when a token exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``,
  ``RAY_AUTH_TOKEN_PATH``); a driver given an explicit address does not. Here, when
  ``RAY_AUTH_MODE`` is unset and the cluster asks for a token, the driver turns token mode on with
  Ray's own loader (the token is sent only to the address the user named) and checks again;
- version mismatch and other refusals by ``ray.init`` itself.

The check runs in a subprocess (``python -m carlos_audit.engines.ray_connect ADDRESS``) so that
Ray's native retry loop and log lines stay out of the driver, with a timeout.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys

from carlos_audit.errors import AuditError

PROBE_TIMEOUT_S = 30
TCP_TIMEOUT_S = 5
AUTH_HELP = ("give the cluster's token in RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH "
             "(`ray get-auth-token` on the head prints it)")


def resolve_address(address: str | None) -> str | None:
    """The cluster to join: ``--ray-address``, else ``RAY_ADDRESS``, else None (start Ray here)."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    return address or None


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS address ``host:port``; None for ``auto`` and ``ray://`` client addresses."""
    if address == "auto" or "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise AuditError(f"Ray address {address!r} is not host:port (e.g. 127.0.0.1:6379, the --port of `ray start --head`)")
    return host.strip("[]"), int(port)


def token_available() -> bool:
    """Whether this process can present a Ray auth token (env variable, token file, ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return os.path.isfile(path)
    return os.path.isfile(os.path.expanduser("~/.ray/auth_token"))


def check_reachable(address: str, host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=TCP_TIMEOUT_S):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError | socket.timeout) else (e.strerror or type(e).__name__)
        raise AuditError(f"cannot reach the Ray cluster at {address}: {why} (unreachable: is `ray start --head` "
                         f"running there with --port {port}, and is the port open from this machine?)") from None


def probe(address: str, token_mode: bool) -> dict:
    """Ask the cluster's GCS for its id, in a subprocess: {"ok": true} or {"error": kind, "detail": text}."""
    env = dict(os.environ)
    if token_mode:
        env["RAY_AUTH_MODE"] = "token"
    try:
        out = subprocess.run([sys.executable, "-m", "carlos_audit.engines.ray_connect", address], env=env,
                             capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": "timeout", "detail": f"no answer from its GCS within {PROBE_TIMEOUT_S} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": "probe", "detail": err[:200]}
    return json.loads(lines[-1])


AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def check_cluster(address: str) -> bool:
    """Check ``address`` answers and accepts this driver; returns whether token mode must be on.
    Raises AuditError (one line) otherwise. Called before a build prepares anything."""
    return _checked_once(address, *(os.environ.get(k) for k in AUTH_ENV))


@functools.cache
def _checked_once(address: str, *auth_settings) -> bool:
    """``_check`` once per (address, auth settings) in this process (a memo; a refusal raises, so
    only a cluster that answered is remembered)."""
    return _check(address)


def _check(address: str) -> bool:
    hp = split_address(address)
    if hp is None:
        return False
    check_reachable(address, *hp)
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    token_mode = mode == "token"
    r = probe(address, token_mode)
    if r.get("error") == "auth" and not mode and token_available():
        token_mode = True
        r = probe(address, token_mode)
    if r.get("ok"):
        return token_mode
    kind, detail = r.get("error"), r.get("detail", "")
    if kind == "auth":
        why = ("the token this driver sent was refused (token mismatch)" if token_mode
               else "the cluster requires token authentication and this driver has no token")
        raise AuditError(f"Ray cluster at {address} refused the connection: {why}; {AUTH_HELP}")
    if kind == "timeout":
        raise AuditError(f"Ray cluster at {address} did not answer ({detail}): is it a Ray GCS port (the --port of `ray start --head`)?")
    raise AuditError(f"cannot connect to the Ray cluster at {address}: {detail}")


def init_ray(address: str | None, runtime_env: dict):
    """``ray.init`` for a build: join ``address`` (checked first) or start Ray in this process."""
    ray = import_ray()
    if address is not None and check_cluster(address):
        os.environ["RAY_AUTH_MODE"] = "token"
    refresh_ray_auth()
    try:
        # a Ray started here: its processes inherit the environment of this call
        local = no_cloud_probe_env(ray._private.services.get_node_ip_address()) if address is None else {}
        with environ_set(local):
            ray.init(address=address, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        errors = [x for x in (e, e.__cause__) if x is not None]  # Ray's "Failed to connect" hides its cause
        first = "; ".join((str(x).strip().splitlines() or [type(x).__name__])[0].strip() for x in errors)
        cause = ("version mismatch between this driver and the cluster" if any("ersion mismatch" in str(x) for x in errors)
                 else "refused")
        raise AuditError(f"cannot join the Ray cluster at {address or '(new local cluster)'}: {cause}: {first[:300]}") from None
    return ray


#: where a Ray head's plain-HTTP requests go when Ray is started here: a closed loopback port
CLOUD_PROBE_SINK = "http://127.0.0.1:9"


def no_cloud_probe_env(node_ip: str | None = None) -> dict:
    """Environment for the processes of a Ray started on this machine, so that its head does not
    query cloud metadata servers.

    Ray 2.60's head always runs ``UsageStatsHead`` (it is the one dashboard module loaded even with
    ``include_dashboard=False``), and that module asks 169.254.169.254 (Azure, AWS) and
    metadata.google.internal which cloud it runs on before it checks whether usage statistics are
    enabled, so ``RAY_USAGE_STATS_ENABLED=0`` does not stop it. It asks with ``requests`` over
    plain HTTP, which honours ``http_proxy``: pointed at a closed port on 127.0.0.1, the probe is
    refused on this machine (no DNS lookup, no packet out) and Ray records the cloud as
    "unknown". ``no_proxy`` keeps loopback and this node's own address direct; Ray's gRPC ignores
    proxies (``RAY_grpc_enable_http_proxy`` is off by default) and HTTPS is untouched. ``node_ip``:
    the address Ray gives this node (kept direct too)."""
    keep = ",".join(dict.fromkeys(["127.0.0.1", "localhost", "::1", *([node_ip] if node_ip else [])]))
    return {"http_proxy": CLOUD_PROBE_SINK, "HTTP_PROXY": CLOUD_PROBE_SINK, "no_proxy": keep, "NO_PROXY": keep}


@contextlib.contextmanager
def environ_set(values: dict, also_restore: tuple = ()):
    """Set ``values`` in os.environ for the block; they (and ``also_restore``) are put back after."""
    before = {k: os.environ.get(k) for k in [*values, *also_restore]}
    os.environ.update(values)
    try:
        yield values
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def refresh_ray_auth() -> None:
    """Make this process's Ray read RAY_AUTH_MODE and the token (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, ~/.ray/auth_token) again before it joins a cluster.

    Ray caches both on first use: its config at import, the token in a process-wide loader. A
    process that joined (or started) one cluster would otherwise present that cluster's token to
    the next one, which refuses it, and ``ray.init`` ends in a bare "Failed to connect"."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _probe_main(address: str) -> None:
    """Subprocess side of ``probe``: one JSON line on stdout."""
    try:
        from ray._raylet import GcsClient
    except ImportError as e:
        print(json.dumps({"error": "probe", "detail": f"Ray is not importable: {e}"}))
        return
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # Ray without token authentication
        AuthenticationError = ()  # noqa: N806
    try:
        GcsClient(address=address).cluster_id
    except AuthenticationError as e:
        print(json.dumps({"error": "auth", "detail": str(e).split(".")[0][:200]}))
        return
    except Exception as e:  # noqa: BLE001  (any other refusal: reported as one line)
        print(json.dumps({"error": "other", "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}))
        return
    print(json.dumps({"ok": True}))


if __name__ == "__main__":
    _probe_main(sys.argv[1])


def import_ray():
    # Ray's usage statistics (on unless disabled) make the head query cloud metadata addresses
    # (169.254.169.254, metadata.google.internal) and report to Anyscale: nothing may leave this
    # machine unasked, so a Ray started or joined from here has them off unless the user chose.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise AuditError("the ray engine needs Ray: pip install 'carlos-audit[ray]' (or pip install 'ray[default]')") from None
    return ray
