"""The cluster path (issue 14): cluster.yaml checked statically (no AWS here), decisions from the cluster's configured
node types rather than the GPUs up at submit time, S3's region from the SDK's chain, and train.workers that no node
set can ever hold refused at once (issue 13 item 8)."""

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from types import SimpleNamespace
from pathlib import Path

import pytest
import yaml

from scmlab.config import ConfigError
from scmlab.train import distributed
from scmlab.tune import sweep

ROOT = Path(__file__).parents[1]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())


def commands(*keys: str) -> str:
    return "\n".join(c for key in keys for c in CLUSTER[key])


def test_cluster_yaml_is_secure_persistent_and_spot_ready():
    head, workers = commands("head_start_ray_commands"), commands("worker_start_ray_commands")
    text = (ROOT / "cluster.yaml").read_text()
    # Ray's token on every node, from a mounted file, never written in the YAML.
    for start in (head, workers):
        ray_start = [c for c in start.split("\n") if "ray start" in c]
        assert ray_start and all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=$HOME/.scmlab/ray_auth_token" in c
                                 for c in ray_start)
    assert CLUSTER["file_mounts"] == {"~/.scmlab/ray_auth_token": ".scmlab/ray_auth_token",
                                      "~/.scmlab/mlflow_password": ".scmlab/mlflow_password"}
    assert not re.search(r"\b[0-9a-f]{64}\b", text)  # no token (64 hex digits) pasted in
    # Nothing listens on every interface: dashboard on 127.0.0.1, MLflow on the private address with basic auth.
    every = commands("setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    assert "0.0.0.0" not in every and "--host 0" not in every
    assert "--dashboard-host=127.0.0.1" in head
    mlflow = next(c for c in CLUSTER["head_start_ray_commands"] if "mlflow server" in c)
    args = shlex.split(mlflow[mlflow.index("mlflow server"):].split("&")[0])
    assert args[args.index("--host") + 1] == "$HEAD_IP" and "HEAD_IP=$(hostname -I" in mlflow
    assert args[args.index("--app-name") + 1] == "basic-auth"
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=\"$(cat ~/.scmlab/mlflow_password)\"" in mlflow
    assert "mlflow_tracking_password" in commands("setup_commands")  # clients' ~/.mlflow/credentials, 0600
    assert "security_group" not in CLUSTER["provider"]  # Ray's own group: SSH from outside, nothing else
    # The store outlives `ray down`: restored before the server starts, saved periodically, in the bucket.
    restore = head.index("scmlab services store restore --db ~/mlflow/mlflow.db")
    assert restore < head.index("mlflow server")
    assert "scmlab services store save --every 300" in head
    assert head.count("s3://${SCMLAB_BUCKET}/mlflow-store/mlflow.db") == 2
    assert "sqlite:///$HOME/mlflow/mlflow.db" in mlflow
    # S3: no region forced anywhere; multipart proxy upload for large artifacts.
    assert "AWS_REGION" not in text and "AWS_DEFAULT_REGION" not in text and "us-east-1" not in text
    assert "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD=true" in head and "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD=true" in workers
    # Autoscaling from zero, decided from the configured node types; a spot GPU type.
    assert "SCMLAB_CLUSTER_CONFIG=$HOME/ray_bootstrap_config.yaml" in head
    types = CLUSTER["available_node_types"]
    assert all(t.get("min_workers", 0) == 0 for name, t in types.items() if name != CLUSTER["head_node_type"])
    assert any(t["node_config"].get("InstanceMarketOptions") == {"MarketType": "spot"} for t in types.values())
    # Every worker runs the spot watcher after its raylet, with Ray's token and the head's GCS (on-demand nodes: it
    # exits at once); it turns AWS's notice into a drain for preemption (tests/test_spot.py).
    watch = next(c for c in CLUSTER["worker_start_ray_commands"] if "spot-watch" in c)
    assert workers.index("ray start") < workers.index("spot-watch")
    assert "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.scmlab/ray_auth_token" in watch
    assert "scmlab services spot-watch --address $RAY_HEAD_IP:6379" in watch
    # Every placeholder is listed in the README's cluster section.
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Clusters on AWS"):]
    section = section[:section.index("\n## ", 1)]
    placeholders = set(re.findall(r"REPLACE[\w-]*|SCMLAB_(?:REPO|COMMIT|BUCKET)|123456789012", text))
    assert placeholders and {p for p in placeholders if p not in section} == set()


def test_daemons_start_once_per_node(tmp_path):
    """The start commands that launch a daemon (MLflow's store saver on the head, the spot watcher on workers) run
    it under `flock -n` on a lock file, so a re-run of `ray up` starts no second one (`pgrep -f` would not do: Ray
    runs each command in `bash -c COMMAND`, whose own command line holds the daemon's). Each command, run twice
    as Ray runs it, with a stand-in `scmlab` on PATH: one daemon, given the command's arguments."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    (home / "mlflow").mkdir(parents=True)
    (home / ".scmlab").mkdir()
    stand_in = bin_dir / "scmlab"
    stand_in.write_text('#!/bin/sh\necho $$ >> "$HOME/pids"\necho "$*" >> "$HOME/started"\nexec sleep 60\n')
    stand_in.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "RAY_HEAD_IP": "10.0.0.2", "SCMLAB_BUCKET": "b"}
    daemons = [c for c in CLUSTER["head_start_ray_commands"] + CLUSTER["worker_start_ray_commands"]
               if "nohup flock -n" in c]
    try:
        for command in daemons * 2:
            subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
        time.sleep(1.0)
        started = sorted((home / "started").read_text().splitlines())
    finally:
        for pid in (home / "pids").read_text().split() if (home / "pids").exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)  # the daemon; its flock ends with it
    assert started == ["services spot-watch --address 10.0.0.2:6379",
                       f"services store save --every 300 --db {home}/mlflow/mlflow.db "
                       "--url s3://b/mlflow-store/mlflow.db"]


def test_decisions_come_from_the_configured_node_types_not_the_nodes_up(make_config, toy_shards, tmp_path):
    nodes = distributed.configured_nodes(CLUSTER, "cluster.yaml")  # the shipped cluster, at full scale
    assert distributed.total(nodes) == {"CPU": 8 + 4 * 4, "GPU": 4}
    config = make_config(toy_shards, tmp_path, train={"workers": 2, "batch_size": 16, "device": "auto"})
    assert distributed.use_gpu(config, nodes)  # no GPU node is up yet: the node types have GPUs
    assert sweep.max_concurrent(config, SimpleNamespace(max_concurrent_trials=0), distributed.total(nodes), True,
                              num_trials=6) == 2
    distributed.check_fits(config, nodes, gpu=True)
    config.train.workers = 5
    with pytest.raises(ConfigError, match=r"train.workers: 5 workers .* at most 4"):
        distributed.check_fits(config, nodes, gpu=True)
    unstated = {**CLUSTER, "available_node_types": {**CLUSTER["available_node_types"],
                                                    "gpu_worker": {"max_workers": 1, "resources": {}}}}
    with pytest.raises(ConfigError, match="gpu_worker.resources must state CPU and GPU"):
        distributed.configured_nodes(unstated, "cluster.yaml")


def test_s3_region_comes_from_the_sdk_chain(monkeypatch, tmp_path):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    profile = tmp_path / "config"
    profile.write_text("[default]\nregion = eu-central-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(profile))
    assert distributed.s3_region("s3://bucket/ray", None) == "eu-central-1"  # was us-east-1 whatever the profile
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert distributed.s3_region("s3://bucket/ray", None) == "ap-south-1"
    monkeypatch.delenv("AWS_REGION")
    profile.write_text("")
    assert distributed.s3_region("s3://bucket/ray", "http://127.0.0.1:8333") == "us-east-1"  # a local store


@pytest.mark.ray
def test_more_workers_than_the_cluster_can_ever_hold_fail_at_once(ray_cluster, toy_shards, make_config, tmp_path):
    from scmlab.train.driver import run

    config = make_config(toy_shards, tmp_path / "run", train={"workers": 3, "batch_size": 6, "cpus_per_worker": 1.0})
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"train.workers: 3 workers of \{'CPU': 1.0\} each can never run on this "
                                          r"cluster, which holds at most 2"):
        run(config)
    assert time.monotonic() - started < 90
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
@pytest.mark.slow  # two short Ray Train runs: about a minute
def test_async_checkpoint_uploads_resume_and_reach_run_dir_byte_for_byte(ray_cluster, toy_shards, make_config,
                                                                         tmp_path):
    import shutil

    from scmlab.train import checkpoint
    from scmlab.train.driver import run

    def config(steps: int):
        return make_config(toy_shards, tmp_path / "async", train={"steps": steps, "batch_size": 8, "workers": 2,
                                                                  "checkpoint_every": 2, "cpus_per_worker": 1.0})

    # What workers killed before their upload leave on this node: a local copy of this run's, and one of another run
    copies = Path(distributed.local_copies(distributed.run_uri(config(4).with_absolute_paths())))
    other = Path(distributed.local_copies(f"{tmp_path}/other"))
    for directory in (copies, other):
        (directory / "step-000000002-x").mkdir(parents=True)
        (directory / "step-000000002-x" / "checkpoint.pt").write_bytes(b"cut short")
    try:
        first = run(config(4))
        assert first["ray_checkpoint"] == f"{tmp_path / 'async'}/step-000000004"
        assert not (copies / "step-000000002-x").exists()  # cleared by the run's workers when they started
        assert (other / "step-000000002-x" / "checkpoint.pt").read_bytes() == b"cut short"  # never another run's
        second = run(config(6))  # the same run storage and name: the driver's restart resumes from step 4
        final = checkpoint.load(second["checkpoint"])
        assert second["step"] == final["step"] == 6
        assert all(s["step"] == 6 for s in final["optimizer"]["state"].values())  # steps 5 and 6 only, once each
        uploaded = tmp_path / "async" / "step-000000006" / "checkpoint.pt"
        assert open(second["checkpoint"], "rb").read() == uploaded.read_bytes()  # copied, not re-serialized
        assert list(copies.iterdir()) == []  # Ray deleted each local copy once its upload finished
    finally:
        shutil.rmtree(copies, ignore_errors=True)
        shutil.rmtree(other, ignore_errors=True)
