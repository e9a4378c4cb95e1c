"""A corpus build on a real Ray cluster started the way users start one (issue 17).

A head (`ray start --head`, token authentication on, no CPUs) and two worker nodes (`ray start
--address`, one CPU each), each with its own temp dir and its own CARLOS_AUDIT_HOME: no folder is
shared between the driver and the workers except the inputs (LoRA folder, template case file;
the tiny models are built from code on each node and checked by hash). Everything on 127.0.0.1.

One test, to start the cluster once (about 1-2 minutes on 2 cores): a driver killed mid-build
(subprocess, SIGKILL), then a second driver that resumes, during which one worker node is killed
mid-unit; every file of DEST must have the sha256 of the local build (test_engines.local_build).
Then connecting to a wrong address or with a wrong token fails in one line, within seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from ray_cluster import Cluster, free_port, loopback_env, ray_sockets, short_tmp
from test_engines import L, P, S, tree_sha256s, inputs, local_build, pinned_clock  # noqa: F401  (fixtures)

from carlos_audit.fileio import read_json

pytestmark = pytest.mark.slow  # a real cluster: head + 2 worker nodes started with `ray start`

VICTIM = "weak/lora/b00003"  # the last arm unit submitted: left for the second driver


@pytest.fixture(scope="module")
def cluster(carlos_home, pinned_clock):  # noqa: F811
    import ray  # noqa: F401  (the `ray` extra: `make test` installs it)
    root = short_tmp()
    c = Cluster(root, {"RAY_AUTH_MODE": "token", "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        c.start_head()
        for name in ("w1", "w2"):
            c.start_worker(name, {"CARLOS_AUDIT_HOME": str(root / name / "home")})
        yield c
    finally:
        c.stop()


def _json_differences(a: Path, b: Path, files: list[str]) -> dict:
    """For differing JSON files, the paths of the values that differ (what to look at first)."""
    import json

    def walk(x, y, path, out):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in x.keys() | y.keys():
                walk(x.get(k), y.get(k), f"{path}.{k}", out)
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]", out)
        elif x != y:
            out.append(f"{path}: {str(x)[:80]} != {str(y)[:80]}")
        return out

    return {f: walk(json.loads((a / f).read_text()), json.loads((b / f).read_text()), "", [])[:10]
            for f in files if f.endswith(".json") and (a / f).is_file() and (b / f).is_file()}


def _records(dest: Path) -> int:
    return sum(1 for _ in (dest / "cases").glob("*/units/*/*.json")) if (dest / "cases").is_dir() else 0


def _kill_node_running_the_victim(cluster, marker: Path, killed: dict) -> None:
    """Background thread: when the victim unit says which node it runs on, kill that node."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not marker.exists():
        time.sleep(0.2)
    if marker.exists():
        killed["sockets"] = ray_sockets(cluster.root, extra_pids=[os.getpid()])  # the driver is connected now
        home = Path(marker.read_text())
        name = home.parent.name
        killed["node"], killed["pids"] = name, cluster.kill_node(name)


def _run_and_stop_a_local_ray_with_another_token() -> None:
    import ray

    other = short_tmp()
    try:
        with loopback_env(other):  # reloads Ray's cached token (test_engines ran a Ray with its own before)
            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     _node_ip_address="127.0.0.1", _temp_dir=str(other / "ray"))
            assert ray.get(ray.put(1)) == 1
            ray.shutdown()
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_cluster_build_without_shared_folders_survives_a_killed_driver_and_a_killed_node(
        cluster, local_build, inputs, carlos_home, tmp_path):  # noqa: F811
    from carlos_audit.engines.corpus_build import build_corpus

    tmp, loras, template = inputs
    dest = tmp / "dest"  # the local build's path (the manifest records the command line, DEST included)
    shutil.rmtree(dest, ignore_errors=True)
    # 0. this process first runs a Ray of its own, with another token (as a notebook might, or
    #    test_engines before this file): the in-process driver of step 2 must still present this
    #    cluster's token, not the one Ray cached then
    _run_and_stop_a_local_ray_with_another_token()
    with loopback_env(cluster.root):
        # 1. a driver (the CLI, in a subprocess) killed after a few units were written
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        drv = subprocess.Popen([sys.executable, "-m", "carlos_audit.cli", "corpus", "build", str(loras), "--casefile",
                                str(template), str(dest), "--engine", "ray", "--ray-address", cluster.address,
                                "--threads", "1", "--no-progress"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while _records(dest) < 4 and drv.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert drv.poll() is None, drv.stdout.read().decode()[-2000:]
        os.killpg(drv.pid, 9)
        drv.wait()
        written = _records(dest)
        assert 4 <= written and not (dest / "corpus.json").exists()
        assert not (dest / "cases" / "weak" / "units" / "lora" / "b00003.json").exists()

        # 2. a new driver resumes; the node running VICTIM is killed while the unit runs
        marker, killed = tmp_path / "victim-node", {}

        def stall_victim_once(unit, threads=None, *case_files):
            import os as _os
            import time as _time

            if unit.key == VICTIM and not marker.exists():
                marker.write_text(_os.environ["CARLOS_AUDIT_HOME"])  # names this node
                _time.sleep(600)  # killed with its node
            from carlos_audit.engines.units import run_unit

            return run_unit(unit, threads, *case_files)

        killer = threading.Thread(target=_kill_node_running_the_victim, args=(cluster, marker, killed), daemon=True)
        killer.start()
        result = build_corpus(loras, template, dest, threads=1, progress=False, engine="ray",
                              ray_address=cluster.address, _unit_fn=stall_victim_once)
    killer.join(5)
    assert killed.get("pids"), "the victim's node was not killed"
    assert result["added"] == ["strong", "target", "weak"]
    b = read_json(dest / "build.json")
    inv = b["this_invocation"]
    assert inv["arm_units_already_done"] >= written - 1  # records of the killed driver kept (one may be the shared copy)
    assert inv["arm_units_executed"] + inv["arm_units_already_done"] == inv["arm_units"]
    assert inv["images_generated"] == sum(n["images_generated"] for n in inv["nodes"].values())
    assert b["images"]["generated"] == b["images"]["minimum"] == (L + 1) * P * S  # nothing generated twice
    assert inv["nodes"] and all(n["units"] > 0 for n in inv["nodes"].values())
    # every Ray process of the cluster and the driver used loopback only (sampled mid-build)
    socks = killed["sockets"]
    assert socks["listening"] and socks["connected"]
    assert socks["non_loopback"] == [], socks["non_loopback"]
    # every file in DEST has the bytes of the local build (build.json aside)
    kept = tmp / "built-cluster"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.move(dest, kept)
    ours, local = tree_sha256s(kept), tree_sha256s(local_build[1])
    differing = sorted(k for k in ours.keys() | local.keys() if ours.get(k) != local.get(k))
    assert not differing, (differing, _json_differences(kept, local_build[1], differing))


def test_wrong_token_and_wrong_address_fail_in_one_line(cluster, inputs, tmp_path):  # noqa: F811
    from carlos_audit.cli import main

    tmp, loras, template = inputs
    cases = {
        "token": ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, cluster.address, "token mismatch"),
        "no token": ({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, cluster.address, "has no token"),
        "address": ({}, f"127.0.0.1:{free_port()}", "cannot reach the Ray cluster"),
    }
    for label, (env, address, expected) in cases.items():
        with loopback_env(cluster.root, **env):
            if "RAY_AUTH_MODE" not in env:
                os.environ.pop("RAY_AUTH_MODE", None)
            t0 = time.monotonic()
            r = CliRunner().invoke(main, ["corpus", "build", str(loras), "--casefile", str(template),
                                          str(tmp_path / f"dest-{label.replace(' ', '-')}"), "--engine", "ray",
                                          "--ray-address", address, "--threads", "1", "--no-progress"])
            took = time.monotonic() - t0
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code != 0 and len(lines) == 1, (label, r.output)
        assert expected in lines[0] and address in lines[0], (label, lines[0])
        assert took < 20, (label, took)
