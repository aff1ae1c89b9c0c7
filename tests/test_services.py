"""Local services for real: SeaweedFS and the MLflow server on 127.0.0.1, started and stopped by the tests."""

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import psutil
import pytest
from boto3.s3.transfer import TransferConfig
from mlflow import MlflowClient

from scmlab import services
from scmlab.tracking import MLflowTracker, ensure_experiment


# `local_services` (the session's SeaweedFS + MLflow server) comes from conftest.py.


def s3_client(env: dict):
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_storage_outlives_its_starter_takes_multipart_uploads_and_restarts_after_a_crash(tmp_path):
    home = tmp_path / "home"
    # Started by another process (a CLI) that exits: the server keeps running and is found again by its pid file.
    subprocess.run([sys.executable, "-c", f"from scmlab import services; services.storage_up({str(home)!r})"],
                   check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=90)
    try:
        first = services.storage_up(home)
        again = services.storage_up(home)
        assert (again["pid"], again["endpoint"]) == (first["pid"], first["endpoint"])
        assert first["endpoint"].startswith("http://127.0.0.1:")
        listening = {c.laddr.ip for c in psutil.Process(first["pid"]).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}

        payload = np.random.default_rng(0).bytes(11 * 2**20)  # 3 parts of 5 MiB (S3's minimum part size)
        (tmp_path / "blob").write_bytes(payload)
        client = s3_client(services.env_for_clients(home))
        chunks = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
        client.upload_file(str(tmp_path / "blob"), "scmlab", "shards/blob", Config=chunks)
        obj = client.get_object(Bucket="scmlab", Key="shards/blob")
        assert obj["ETag"].strip('"').endswith("-3")  # assembled from parts
        assert obj["Body"].read() == payload

        # A crashed server is started again on its previous port, with its data.
        psutil.Process(first["pid"]).kill()
        psutil.Process(first["pid"]).wait(10)
        restarted = services.storage_up(home)
        assert restarted["pid"] != first["pid"] and restarted["endpoint"] == first["endpoint"]
        assert client.get_object(Bucket="scmlab", Key="shards/blob")["Body"].read() == payload
    finally:
        services.services_down(home)

    assert not psutil.pid_exists(restarted["pid"])
    assert not port_open(restarted["port"])
    assert services.services_status(home) == {"storage": None, "mlflow": None}
    services.services_down(home)  # idempotent
    with pytest.raises(services.ServiceError, match="not running"):
        services.env_for_clients(home)


def test_mlflow_run_lands_in_server_and_bucket(local_services, tmp_path):
    env = local_services["env"]
    uri = env["MLFLOW_TRACKING_URI"]
    assert uri == local_services["mlflow"]["tracking_uri"]
    assert services.mlflow_up(local_services["home"])["pid"] == local_services["mlflow"]["pid"]

    experiment_id = ensure_experiment(uri, "services-test")
    (tmp_path / "notes.txt").write_text("sCM run notes")
    with MLflowTracker(uri, experiment_id=experiment_id, run_name="smoke") as tracker:
        tracker.log_params({"optim": {"lr": 1e-4}, "train": {"batch_size": 8}})
        tracker.log_metrics({"loss/train": 0.5}, step=1)
        tracker.log_metrics({"loss/train": 0.25}, step=2)
        tracker.log_artifact(tmp_path / "notes.txt")
        tracker.log_image(np.full((4, 4, 3), 128, np.uint8), "samples", step=2)

    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.0001", "train.batch_size": "8"}
    history = MlflowClient(uri).get_metric_history(tracker.run_id, "loss/train")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]

    client = s3_client(env)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="scmlab", Prefix="mlflow/")["Contents"]]
    notes = [k for k in keys if k.endswith(f"{tracker.run_id}/artifacts/notes.txt")]
    assert len(notes) == 1
    assert client.get_object(Bucket="scmlab", Key=notes[0])["Body"].read() == b"sCM run notes"
    assert any("/artifacts/images/samples" in k for k in keys)


def test_credentials_stay_in_their_file(local_services, caplog):
    home = local_services["home"]
    creds_path = home / services.CREDENTIALS_FILE
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
    creds = json.loads(creds_path.read_text())
    secrets = [creds["AWS_ACCESS_KEY_ID"].encode(), creds["AWS_SECRET_ACCESS_KEY"].encode()]
    assert all(len(s) >= 16 for s in secrets)

    with caplog.at_level("DEBUG", logger="scmlab"):
        services.services_up(home)  # finds the running servers
        services.env_for_clients(home)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("scmlab"))
    files = [p for p in Path(home).rglob("*") if p.is_file() and p != creds_path]
    assert {"storage.json", "mlflow.json", "storage.log", "mlflow.log"} <= {p.name for p in files}
    leaked = [str(p) for p in files for s in secrets if s in p.read_bytes()]
    assert leaked == []
    assert not any(s.decode() in ours for s in secrets)
    for name in ("storage", "mlflow"):  # nor on the servers' command lines, which every user can read
        cmdline = " ".join(psutil.Process(local_services[name]["pid"]).cmdline())
        assert not any(s.decode() in cmdline for s in secrets)


def _https(port: int, path: str, home=None):
    """(status, body) of GET https://127.0.0.1:port/path, presenting the home's client certificate when given."""
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(home / "tls" / "ca.crt")) if home else \
        ssl._create_unverified_context()
    if home:
        context.load_cert_chain(home / "tls" / "node.crt", home / "tls" / "node.key")
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", timeout=5, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_store_answers_only_s3_with_credentials_and_the_home_is_private(local_services, tmp_path, caplog):
    import ssl
    import urllib.request

    home, state = local_services["home"], local_services["storage"]
    flags = dict(a.lstrip("-").split("=", 1) for a in state["argv"] if a.startswith("-") and "=" in a)
    http = {name: int(flags[f"{name}.port"]) for name in ("master", "volume", "filer", "admin")}
    listening = {c.laddr.port for c in psutil.Process(state["pid"]).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    grpc = listening - set(http.values()) - {state["port"]}
    assert len(grpc) == 5  # master, volume, filer, admin, s3
    for name in ("master", "volume", "filer"):  # mutual TLS: refused without the home's key, open with it
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
            _https(http[name], "/")
        assert _https(http[name], "/", home)[0] in (200, 400)
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
        _https(http["filer"], "/buckets/")
    assert b"/buckets/scmlab" in _https(http["filer"], "/buckets/", home)[1]  # what the key would open
    for port in grpc:
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                with ssl._create_unverified_context().wrap_socket(sock) as tls:
                    tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                    tls.recv(1)
    for path in ("/", "/login", "/api/cluster/topology", "/api/s3/buckets"):  # the admin UI is off
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{http['admin']}{path}", timeout=5)
    with pytest.raises(urllib.error.HTTPError, match="403"):  # S3 without credentials
        urllib.request.urlopen(f"{state['endpoint']}/scmlab/", timeout=5)

    modes = {p.relative_to(home): stat.S_IMODE(p.lstat().st_mode) for p in (home, *home.rglob("*"))}
    assert modes[Path(".")] == modes[Path("storage")] == modes[Path("tls")] == 0o700
    assert modes[Path("mlflow.db")] == modes[Path("tls/node.key")] == modes[Path("security.toml")] == 0o600
    # Every directory is its owner's only, so nothing below the home is reachable by another user, even the volume
    # info files (*.vif) that SeaweedFS writes 0644 whatever the umask when a test grows a volume.
    assert {p for p, m in modes.items() if m & 0o077 and (home / p).is_dir()} == set()
    assert {p for p, m in modes.items() if m & 0o077 and p.suffix != ".vif"} == set()

    old = tmp_path / "old-home"  # a home from before: tightened, with a warning
    (old / "storage").mkdir(parents=True, mode=0o755)
    (old / "mlflow.db").write_bytes(b"")
    (old / "mlflow.db").chmod(0o644)
    services._private_home(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (old, old / "storage", old / "mlflow.db")] == [0o700, 0o700, 0o600]
    assert "were open to other users" in caplog.text


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    import jsonschema
    import ray.autoscaler
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).parents[1] / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # Ray's own checks after merging its AWS defaults; no cloud calls

    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]["node_config"]
    assert head["InstanceType"] == "m5.2xlarge"
    gpu = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert gpu and all(n["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6", "p4d", "p5") for n in gpu)
    assert all("IamInstanceProfile" in n["node_config"] for n in nodes.values())
    setup = "\n".join(config["setup_commands"])
    assert '"scmlab[cluster] @ git+${SCMLAB_REPO}@${SCMLAB_COMMIT}"' in setup
    head_start = "\n".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_start and "--artifacts-destination s3://" in head_start
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in "\n".join(config["worker_start_ray_commands"])
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            subprocess.run(["bash", "-n", "-c", command], check=True)  # shell syntax
