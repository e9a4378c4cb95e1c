"""Corpus builds as work units on the local and Ray engines (issue 8).

A build of L = 3 demo LoRAs (copied into a tmp folder) under a tiny protocol: builtin:demo
(8 prompts) x 2 seeds, 3 steps, batch 4. Every build starts from an empty base-image cache and
with SOURCE_DATE_EPOCH set, at the same DEST path (moved aside afterwards), so two builds of the
same inputs must write the same bytes everywhere in DEST except build.json (engine, wall time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
import ray_cluster  # noqa: F401  (sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported)
from conftest import write_case

from carlos_audit.fileio import read_json
from carlos_audit.hashing import sha256_file

SDE = "1700000000"
LORAS = ("strong", "target", "weak")
L, P, S, STEPS, BATCH = 3, 8, 2, 3, 4


@pytest.fixture(scope="module")
def pinned_clock():
    before = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = SDE
    yield SDE
    if before is None:
        os.environ.pop("SOURCE_DATE_EPOCH", None)
    else:
        os.environ["SOURCE_DATE_EPOCH"] = before


@pytest.fixture(scope="module")
def inputs(demo_assets, pinned_clock, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engines")
    loras = tmp / "loras"
    loras.mkdir()
    for k in LORAS:
        shutil.copy(demo_assets["loras"][k], loras / f"{k}.safetensors")
    template = write_case(tmp, demo_assets, case_id="tmpl", steps=STEPS, batch_size=BATCH)
    return tmp, loras, template


def _build(inputs, home: Path, label: str, **kw) -> tuple[dict, Path]:
    from carlos_audit.engines.corpus_build import build_corpus

    tmp, loras, template = inputs
    dest = tmp / "dest"
    shutil.rmtree(home / "base-cache", ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    result = build_corpus(loras, template, dest, threads=1, progress=False, **kw)
    kept = tmp / f"built-{label}"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.move(dest, kept)
    return result, kept


def _alive(pid: int, wait_s: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


def tree_sha256s(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "build.json"}


@pytest.fixture(scope="module")
def local_build(inputs, carlos_home):
    return _build(inputs, carlos_home, "local", engine="local")


@pytest.fixture(scope="module")
def ray_cluster(carlos_home, pinned_clock):
    """Ray started in this process, on loopback only (see ray_cluster.py), its own temp dir."""
    from ray_cluster import loopback_env, ray_resolves_loopback, ray_sockets, short_tmp

    import ray  # the `ray` extra: `make test` installs it
    assert ray_resolves_loopback(), "Ray was imported before tests/ray_cluster.py set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    tmp = short_tmp()
    with loopback_env(tmp):  # reloads Ray's cached token: this one, not one cached earlier in this process
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _node_ip_address="127.0.0.1", _temp_dir=str(tmp / "ray"),
                 runtime_env={"env_vars": {"CARLOS_AUDIT_HOME": str(carlos_home), "OMP_WAIT_POLICY": "PASSIVE",
                                           "SOURCE_DATE_EPOCH": SDE}})
        try:
            yield ray
            socks = ray_sockets(tmp)
            assert socks["listening"], "no Ray sockets found: the check would prove nothing"
            assert socks["non_loopback"] == [], socks["non_loopback"]
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def test_build_generates_L_plus_1_times_P_times_S_images_counted_by_hooks(local_build):
    result, dest = local_build
    assert result["added"] == list(LORAS) and result["n"] == L
    b = read_json(dest / "build.json")
    images = (L + 1) * P * S
    assert b["images"]["minimum"] == images == 64 and b["images"]["naive_per_lora_base"] == 2 * L * P * S
    t = b["cost"]["total"]
    assert t["images_generated"] == images
    assert t["unet_forward_calls"] == (L + 1) * (P * S // BATCH) * STEPS  # one batched call per step (CFG inside)
    assert t["unet_image_steps"] == images * STEPS
    assert t["unet_latent_evaluations"] == 2 * images * STEPS  # guidance 5: cond + uncond latents
    assert t["vae_decoded_images"] == images and t["vae_decoder_calls"] == (L + 1) * P * S // BATCH
    assert t["clip_image_encodings"] == images  # the shared base arm is embedded once, not per LoRA
    assert b["cost"]["shared_arms"]["images_generated"] == P * S
    (sid, shared), = b["shared_arms"].items()
    assert shared["used_by"] == list(LORAS)
    for rid in LORAS:
        m = read_json(dest / "cases" / rid / "manifest.json")
        c = m["cost"]
        assert c["arms"]["base"]["sources"] == {"shared": P * S // BATCH}
        assert c["arms"]["lora"]["sources"] == {"generated": P * S // BATCH}
        assert c["total"]["images_generated"] == P * S and c["shared"]["images_generated"] == P * S
        rec = read_json(dest / "cases" / rid / "units" / "base" / "b00000.json")
        assert rec["source"] == "shared" and rec["shared_from"] == f"_shared/{sid}"
        # the copied base arm is the shared one, byte for byte
        for p in rec["pairs"]:
            assert sha256_file(dest / "cases" / rid / p["image"]) == p["image_sha256"]
            assert sha256_file(dest / "cases" / "_shared" / sid / p["image"]) == p["image_sha256"]


def test_interrupted_local_build_resumes_to_the_same_bytes(local_build, inputs, carlos_home):
    """A build stopped after a few units resumes (CLI, --engine local) without redoing any unit."""
    from carlos_audit.cli import main
    from carlos_audit.engines.corpus_build import build_corpus
    from carlos_audit.engines.units import run_unit

    tmp, loras, template = inputs
    dest = tmp / "dest"
    shutil.rmtree(carlos_home / "base-cache", ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    calls = []

    def stop_after_six(unit, threads=None, *case_files):
        if len(calls) == 6:
            raise KeyboardInterrupt
        calls.append(unit.key)
        return run_unit(unit, threads, *case_files)

    with pytest.raises(KeyboardInterrupt):
        build_corpus(loras, template, dest, threads=1, progress=False, _unit_fn=stop_after_six)
    assert not (dest / "corpus.json").exists()
    r = CliRunner().invoke(main, ["corpus", "build", str(loras), "--casefile", str(template), str(dest),
                                  "--engine", "local", "--threads", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "images generated" in r.output
    b = read_json(dest / "build.json")
    assert b["this_invocation"]["arm_units_already_done"] == 6
    assert b["images"]["generated"] == (L + 1) * P * S  # the whole build's records: nothing generated twice
    assert tree_sha256s(dest) == tree_sha256s(local_build[1])
    shutil.rmtree(dest)


def test_ray_build_equals_local_build_byte_for_byte(local_build, inputs, carlos_home, ray_cluster):
    result, dest = _build(inputs, carlos_home, "ray", engine="ray")
    assert result["build"]["engine"] == "ray"
    local = tree_sha256s(local_build[1])
    assert tree_sha256s(dest) == local
    for f in ("corpus.json", "rows.parquet", "directions.npy"):
        assert f in local


def test_killed_ray_worker_is_retried_and_the_corpus_is_unchanged(local_build, inputs, carlos_home, ray_cluster, tmp_path):
    marker, retried = tmp_path / "killed-once", tmp_path / "retried"
    victim = "target/lora/b00001"

    def die_mid_unit_once(unit, threads=None, *case_files):
        # defined here so Ray ships it by value; kills the worker process (os._exit) after the
        # unit's images and embeddings are computed and before its result reaches the driver
        import os as _os

        from carlos_audit.engines.units import run_unit

        result = run_unit(unit, threads, *case_files)
        if unit.key == victim and marker.exists():
            retried.write_text(str(_os.getpid()))
        if unit.key == victim and not marker.exists():
            marker.write_text(str(_os.getpid()))
            _os._exit(1)
        return result

    result, dest = _build(inputs, carlos_home, "ray-killed", engine="ray", _unit_fn=die_mid_unit_once)
    killed_pid, retry_pid = int(marker.read_text()), int(retried.read_text())
    assert killed_pid != retry_pid  # the unit ran again in another worker ...
    assert not _alive(killed_pid)  # ... because the first one died mid-unit
    assert read_json(dest / "cases" / "target" / "units" / "lora" / "b00001.json")["source"] == "generated"
    assert tree_sha256s(dest) == tree_sha256s(local_build[1])


def test_a_node_with_a_different_input_file_refuses_the_unit_naming_node_and_file(inputs, tmp_path):
    """The driver plans with each input's sha256; a worker whose copy differs refuses before generating."""
    from dataclasses import replace

    from carlos_audit.case.casefile import load_case
    from carlos_audit.engines.corpus_build import case_for_lora
    from carlos_audit.engines.build_plan import plan_build
    from carlos_audit.engines.inputs import node_label
    from carlos_audit.engines.units import run_unit
    from carlos_audit.errors import AuditError

    import torch

    threads_before = torch.get_num_threads()
    _, loras, template = inputs
    lora = tmp_path / "target.safetensors"
    shutil.copy(loras / "target.safetensors", lora)
    plan = plan_build(tmp_path / "dest", [("target", lora, case_for_lora(load_case(template), lora, "target"))])
    unit = next(u for u in plan.arm_units if u.arm == "lora")
    shutil.copy(loras / "strong.safetensors", lora)  # this "node" holds another file at the same path
    with pytest.raises(AuditError, match=rf"node {node_label()}: lora {lora} has sha256 \w+ here, the build planned "
                                         rf"{unit.lora_sha256} .*refusing unit target/lora/b00000"):
        run_unit(unit, 1)
    bad = replace(unit, inputs=tuple((r, p, "0" * 64 if r == "base_model" else h) for r, p, h in unit.inputs))
    shutil.copy(loras / "target.safetensors", lora)
    with pytest.raises(AuditError, match=r"base_model embedded:tiny-sd has sha256 \w+ here, the build planned 0{64}"):
        run_unit(bad, 1)
    assert not any((tmp_path / "dest" / "cases" / "target").glob("units/*/*.json"))  # nothing written
    # run_unit(unit, 1) ran in this process: it must give the thread count back (it changes CPU bits)
    assert torch.get_num_threads() == threads_before


def test_ray_address_errors_are_one_line_and_fast(monkeypatch):
    import socket
    import time

    from carlos_audit.engines.ray_connect import check_cluster, resolve_address
    from carlos_audit.errors import AuditError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(AuditError, match=rf"cannot reach the Ray cluster at 127.0.0.1:{port}: .*unreachable"):
        check_cluster(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10
    with pytest.raises(AuditError, match="is not host:port"):
        check_cluster("headnode")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_address(None) == "10.0.0.5:6379" and resolve_address("127.0.0.1:1") == "127.0.0.1:1"


def test_a_ray_head_started_here_cannot_query_cloud_metadata():
    """Ray 2.60's head asks 169.254.169.254 and metadata.google.internal which cloud it is on, even
    with usage statistics off. Run that very function of Ray's, in a subprocess with the environment
    the product gives a Ray it starts (and the test clusters use): every connection it attempts is
    to 127.0.0.1 and no host name is resolved."""
    from carlos_audit.engines.ray_connect import CLOUD_PROBE_SINK, no_cloud_probe_env

    code = (
        "import json, sys\n"
        "seen = []\n"
        "def hook(event, args):\n"
        "    if event == 'socket.connect': seen.append(['connect', str(args[1])])\n"
        "    if event == 'socket.getaddrinfo': seen.append(['resolve', str(args[0])])\n"
        "from ray._common.usage import usage_lib\n"
        "sys.addaudithook(hook)\n"
        "cloud = usage_lib.get_cloud_from_metadata_requests()\n"
        "print(json.dumps({'cloud': cloud, 'seen': seen}))\n")
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env |= no_cloud_probe_env()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["cloud"] == "unknown"
    connects = [t for kind, t in out["seen"] if kind == "connect"]
    assert connects, "the probe made no connection attempt: the check would prove nothing"
    sink = CLOUD_PROBE_SINK.removeprefix("http://").split(":")
    assert all(t == str((sink[0], int(sink[1]))) for t in connects), out["seen"]
    assert all(t in ("127.0.0.1", "localhost") for kind, t in out["seen"] if kind == "resolve"), out["seen"]
