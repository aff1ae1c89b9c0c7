"""Shared fixtures: tiny shard datasets (written once per session), debug-size configs over them, and the servers
that integration tests share: the local S3 + MLflow services and a Ray head (one of each per session)."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import psutil
import pytest

from scmlab import data, services
from scmlab.config import Config

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s), and a worker's
# `ray.train.report` waits for the poll that takes the previous report: a test's runs, which checkpoint every few
# tenths of a second, spent most of their time there (a 400-step run with 8 checkpoints: 27 s at 2 s, 12 s at 0.2 s).
# Every Ray process of the tests (drivers, the session's head, local clusters) inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory) -> str:
    """512 2-D vectors from an 8-mode Gaussian mixture, unconditional, 2 shards."""
    out = str(tmp_path_factory.mktemp("toy"))
    data.prepare("toy-gmm", out, shard_size=256, limit=512, progress=False)
    return out


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory) -> str:
    """128 8x8 grayscale digits with 10 classes, 2 shards."""
    out = str(tmp_path_factory.mktemp("digits"))
    data.prepare("digits", out, shard_size=64, limit=128, progress=False)
    return out


def tiny_config(shards: str, run_dir, **sections) -> Config:
    """A CPU, debug-size config: MLP 'tiny' on vectors or UNet 'ci' on images; `sections` update the defaults,
    e.g. tiny_config(url, dir, train={"steps": 4}, objective={"kind": "diffusion"})."""
    image = data.read_manifest(shards)["kind"] == "image"
    d = {
        "data": {"train": shards},
        "model": {"arch": "unet", "size": "ci"} if image else {"arch": "mlp", "size": "tiny"},
        "objective": {"kind": "sct", "warmup_steps": 4},
        "optim": {"lr": 1e-3},
        "train": {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 1, "device": "cpu",
                  "ema_half_life": 100},
        "run": {"dir": str(run_dir)},
    }
    for name, values in sections.items():
        d[name] = {**d.get(name, {}), **values}
    return Config.from_dict(d)


@pytest.fixture
def make_config():
    return tiny_config


# ---- servers shared by the whole session: the local S3 + MLflow services, and a Ray head ---------------------------

# The session's services home. Its Ray token (created here, mode 0600, as `scmlab services up` creates it) must be
# in this process's environment before Ray first reads its configuration, which happens once per process: every Ray
# process of the session (the head, this driver, `ray job submit`, a local ray.init()) then uses that token, and
# nothing depends on a ~/.ray/auth_token left by earlier work.
SESSION_HOME = tempfile.mkdtemp(prefix="scmlab-home-")
os.environ.update(services.ray_auth_env(SESSION_HOME))


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: tests that run Ray Train or Ray jobs on the session's local Ray head")


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def local_services():
    """SeaweedFS + MLflow server in the session's home for the whole session:
    {"home": Path, "storage": state, "mlflow": state, "env": env_for_clients(home)}."""
    home = Path(SESSION_HOME)
    started = services.services_up(home)
    try:
        yield {"home": home, **started, "env": services.env_for_clients(home)}
    finally:
        services.services_down(home)


# In the environment of the session's Ray processes, as a credential would be: it must never reach MLflow or a log.
RAY_SECRET = ("SCMLAB_TEST_SECRET_KEY", "s3cr3t-" + os.urandom(12).hex())


@pytest.fixture(scope="session")
def ray_cluster(local_services, tmp_path_factory):
    """The README's `scmlab services run -- ray start --head` on 127.0.0.1 (dashboard and job API on 127.0.0.1 too):
    the services' client environment in its processes (Ray's token among it), as cluster.yaml gives a cluster's
    nodes, and an empty HOME, as on a new machine. This process joins it as a driver, shipping the scmlab package as
    scmlab.train.distributed.connect does. {"address", "dashboard", "temp_dir", "home"} (home: the head's HOME).

    Stopped by killing its process group: `ray stop` would stop every Ray on the machine."""
    import ray

    from scmlab.train.distributed import PACKAGE_DIR

    # Short: Ray's socket paths have a length limit. Under RAY_TMPDIR when set (CI keeps Ray out of /tmp/ray).
    temp_dir = tempfile.mkdtemp(prefix="scmlab-ray-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    home = tmp_path_factory.mktemp("empty-home")
    # Every port chosen free: another Ray on this machine holds the defaults (the job agent's 52365, the client
    # server's 10001, ...), and a clash leaves the job API without an agent.
    ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "metrics-export-port",
                                             "runtime-env-agent-port", "ray-client-server-port")}
    env = {**os.environ, RAY_SECRET[0]: RAY_SECRET[1], "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(home),
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}  # system metrics within a short test run
    head = subprocess.Popen(["scmlab", "services", "run", "--home", str(local_services["home"]), "--",
                             "ray", "start", "--head", f"--temp-dir={temp_dir}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             *(f"--{name}={value}" for name, value in ports.items())],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    port, dashboard = ports["port"], ports["dashboard-port"]
    out = head.communicate(timeout=180)[0].decode(errors="replace")
    try:
        assert head.returncode == 0, out
        ray.init(address=f"127.0.0.1:{port}", runtime_env={"py_modules": [PACKAGE_DIR]})
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "temp_dir": temp_dir,
               "home": home}
    finally:
        ray.shutdown()
        _kill_group(head.pid)


def ray_workers(ray) -> list[psutil.Process]:
    """The Ray Train worker processes of the session's Ray (`ray_cluster`) or of one node (`ray_node`): they carry its
    temp dir in no argument, but they descend from its raylet, which does."""
    raylets = [p for p in psutil.process_iter(["name", "cmdline"])
               if p.info["name"] == "raylet" and any(ray["temp_dir"] in a for a in p.info["cmdline"] or [])]
    found = []
    for raylet in raylets:
        for child in raylet.children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(child.cmdline()) + child.name():
                    found.append(child)
            except psutil.Error:
                pass
    return found


def logged_steps(client, experiment: str, key: str = "train/step") -> list:
    """The metric history of `key` in the (one) run of `experiment` (MlflowClient `client`), [] while there is none."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return client.get_metric_history(runs[0].info.run_id, key) if runs else []


@contextlib.contextmanager
def ray_node(ray_cluster, local_services, num_cpus: int):
    """A second node of the session's Ray on this machine (`ray start --address`, as on the cluster's other
    machines: through `scmlab services run`, free ports, a temp dir of its own), stopped (its process group) after.
    Yields {"temp_dir", "raylet": psutil.Process, "node_id": hex}."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="scmlab-node-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    ports = {name: _free_port() for name in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port")}
    env = {**os.environ, RAY_SECRET[0]: RAY_SECRET[1], "RAY_USAGE_STATS_ENABLED": "0",
           "HOME": str(ray_cluster["home"])}
    node = subprocess.Popen(["scmlab", "services", "run", "--home", str(local_services["home"]), "--", "ray", "start",
                             f"--address={ray_cluster['address']}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
                             *(f"--{name}={value}" for name, value in ports.items())],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = node.communicate(timeout=180)[0].decode(errors="replace")
    try:
        assert node.returncode == 0, out
        raylet = next(p for p in psutil.process_iter(["name", "cmdline"])
                      if p.info["name"] == "raylet" and any(temp_dir in a for a in p.info["cmdline"] or []))
        node_id = next(n["NodeID"] for n in ray.nodes()
                       if n["Alive"] and n["NodeManagerPort"] == ports["node-manager-port"])
        yield {"temp_dir": temp_dir, "raylet": raylet, "node_id": node_id}
    finally:
        _kill_group(node.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(pgid: int) -> None:
    """SIGTERM the processes of a process group, SIGKILL what is left after 2 s (a Ray head's gcs_server, raylet and
    agents outlast a SIGTERM by more than 10 s: a longer wait only delayed the kill)."""

    def members():
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.Error, ProcessLookupError):
                pass
        return found

    for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
        procs = members()
        if not procs:
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        psutil.wait_procs(procs, timeout=wait)


@pytest.fixture(scope="session")
def s3_toy_shards(local_services) -> str:
    """toy_shards' 512 vectors in the session's S3 server (4 shards): s3://scmlab/tests/toy-gmm."""
    url = "s3://scmlab/tests/toy-gmm"
    with client_env(local_services):
        data.prepare("toy-gmm", url, shard_size=128, limit=512, progress=False)
    return url


@contextlib.contextmanager
def client_env(local_services):
    """This process as a client of the session's services (S3 endpoint and credentials, MLflow URI), undone after."""
    from scmlab.data import s3

    with mock.patch.dict(os.environ, local_services["env"]):
        s3.configure_s3()  # drop S3 clients made with another environment
        try:
            yield
        finally:
            s3.configure_s3()
