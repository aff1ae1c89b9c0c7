"""The spot watcher (scmlab.spot) against a fake EC2 metadata service (IMDSv2: session tokens that expire, 404 until a
notice): the notice read and renewed as AWS serves it, an on-demand instance left alone, this machine's Ray node
found on a real GCS; and end to end, a spot reclaim on a real second Ray node: the watcher drains it, the worker
checkpoints at once, trains on to the deadline, and the run resumes from that checkpoint."""

import contextlib
import json
import subprocess
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest
from conftest import client_env, logged_steps, ray_node, ray_workers
from mlflow import MlflowClient

from scmlab import spot
from scmlab.train import checkpoint
from scmlab.train.driver import run


class FakeMetadata(ThreadingHTTPServer):
    """IMDSv2 on 127.0.0.1: PUT /latest/api/token gives a token; GET /latest/meta-data/PATH needs the current one
    (401 otherwise) and answers `values[PATH]`, 404 where there is none. `expire()` invalidates the tokens given."""

    def __init__(self, lifecycle: str = "spot"):
        super().__init__(("127.0.0.1", 0), Handler)
        self.values, self.generation, self.requests = {"instance-life-cycle": lifecycle}, 0, []
        self.failures = 0  # this many next GETs answer 500, as a service that is briefly down
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def expire(self):
        self.generation += 1

    def announce(self, at: float, action: str = "terminate"):
        """The interruption notice, as AWS writes it (whole seconds, UTC)."""
        stamp = datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.values["spot/instance-action"] = json.dumps({"action": action, "time": stamp})


class Handler(BaseHTTPRequestHandler):
    def do_PUT(self):
        self.server.requests.append(("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")))
        self._answer(200, f"token-{self.server.generation}" if self.path == "/latest/api/token" else None)

    def do_GET(self):
        path = self.path.removeprefix("/latest/meta-data/")
        self.server.requests.append(("GET", path, self.headers.get("X-aws-ec2-metadata-token")))
        if self.server.failures > 0:
            self.server.failures -= 1
            self._answer(500, "")
        elif self.headers.get("X-aws-ec2-metadata-token") != f"token-{self.server.generation}":
            self._answer(401, "")
        else:
            value = self.server.values.get(path)
            self._answer(200 if value is not None else 404, value or "")

    def _answer(self, code: int, body: str | None):
        data = (body or "").encode()
        self.send_response(code if body is not None else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def fake_metadata(lifecycle: str = "spot"):
    server = FakeMetadata(lifecycle)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_notice_is_read_with_a_session_token_renewed_when_it_expires():
    with fake_metadata() as server:
        metadata = spot.Metadata(server.url)
        assert spot.notice(metadata) is None  # 404: no notice
        server.announce(1764590400.0, "stop")
        assert spot.notice(metadata) == ("stop", 1764590400.0)
        server.expire()  # the token held is refused (401) once: a new one is asked for, the request repeated
        assert spot.notice(metadata) == ("stop", 1764590400.0)
        puts = [r for r in server.requests if r[0] == "PUT"]
        assert [ttl for *_, ttl in puts] == [str(spot.TOKEN_TTL_S)] * 2
        assert [r for r in server.requests if r[0] == "GET"][-2:] == [
            ("GET", "spot/instance-action", "token-0"), ("GET", "spot/instance-action", "token-1")]
        server.values["spot/instance-action"] = "<html>maintenance</html>"
        with pytest.raises(ValueError, match="spot/instance-action: not an interruption notice"):
            spot.notice(metadata)


def test_an_on_demand_instance_is_not_watched_and_no_metadata_service_is_named():
    with fake_metadata("on-demand") as server:  # and no Ray at the address: it is never reached
        assert spot.watch("127.0.0.1:1", spot.Metadata(server.url), every=0.1) == "not spot"
        gone = server.url
    with pytest.raises(OSError, match=f"instance metadata {gone}/latest/meta-data/instance-life-cycle: .*refused"):
        spot.watch("127.0.0.1:1", spot.Metadata(gone))


@pytest.mark.ray
def test_the_node_at_an_address_is_found_on_the_gcs(ray_cluster):
    """On the session's one-node cluster the head is the node at this machine's address (the one the watcher asks
    for); nobody is at another."""
    import ray
    from ray._raylet import GcsClient

    gcs = GcsClient(address=ray_cluster["address"])
    assert spot.node_here(gcs, ray.util.get_node_ip_address()) == ray.get_runtime_context().get_node_id()
    with pytest.raises(RuntimeError, match="0 alive Ray nodes at 192.0.2.99"):
        spot.node_here(gcs, "192.0.2.99")


@pytest.mark.ray
@pytest.mark.slow
def test_spot_reclaim_notice_checkpoints_at_once_and_the_run_resumes_from_it(ray_cluster, local_services, toy_shards,
                                                                            make_config, tmp_path, monkeypatch):
    """A spot reclaim as AWS announces it: the worker (2 CPUs) trains on a second node, "spot" (the head's 2 CPUs
    are held meanwhile), where `scmlab services spot-watch` polls a fake metadata service. The notice appears there;
    the watcher drains the node for preemption with the notice's time as deadline. The worker writes one checkpoint
    at its next log step (there is no periodic checkpoint before the last step: one elsewhere can only be the
    just-in-time one) and trains on until the deadline, when Ray Train stops it and the spot node dies; the run
    resumes from that checkpoint on the head, freed meanwhile, and finishes in its one MLflow run. With
    train.max_failures 0: Ray counts the restart as a preemption (FailureConfig.max_preemption_failures)."""
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")  # Ray Train hands both to its controller
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # (defaults 5 s and 2 s)
    import ray

    steps, log_every = 800, 10
    run_name = f"spot-{time.time_ns()}"
    storage = tmp_path / "storage"
    config = make_config(toy_shards, tmp_path / "run",
                         train={"steps": steps, "batch_size": 16, "workers": 1, "cpus_per_worker": 2,
                                "log_every": log_every, "checkpoint_every": steps, "keep_checkpoints": 0,
                                "max_failures": 0},
                         run={"storage": str(storage), "name": run_name},
                         tracking={"kind": "mlflow", "uri": local_services["mlflow"]["tracking_uri"],
                                   "experiment": run_name, "system_metrics": False})
    client = MlflowClient(config.tracking.uri)
    result = {}

    def train():
        result["summary"] = run(config)

    head_held = ray.remote(num_cpus=2)(threading.Event).remote()  # on the head, the only node yet
    ray.get(head_held.is_set.remote())
    with (client_env(local_services), fake_metadata() as metadata,
          ray_node(ray_cluster, local_services, num_cpus=2) as node):
        watcher = subprocess.Popen(
            ["scmlab", "services", "run", "--home", str(local_services["home"]), "--", "scmlab", "services",
             "spot-watch", "--address", ray_cluster["address"], "--node-id", node["node_id"], "--metadata",
             metadata.url, "--every", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        while trainer.is_alive() and len(history := logged_steps(client, run_name)) < 4:
            time.sleep(0.1)
        on_spot = ray_workers(node)
        assert len(on_spot) == 1 and not ray_workers(ray_cluster)  # the worker is on the spot node
        # The notice's deadline at 25% of the time the run still needs (at its speed so far, the first log step
        # left out; a run speeds up after its first steps): the worker trains on until it, as on a reclaimed node.
        rate = (history[-1].value - history[1].value) / (history[-1].timestamp - history[1].timestamp) * 1000
        noticed = history[-1].value  # logged before the notice: the checkpoint comes after it
        deadline = float(int(time.time() + max(3.0, 0.25 * (steps - noticed) / rate)) + 1)  # whole seconds
        metadata.failures = 2  # the service fails twice just before the notice: the watcher asks again
        metadata.announce(deadline)
        out = watcher.communicate(timeout=60)[0]
        assert watcher.returncode == 0 and out.strip().endswith("drained"), out
        failed = f"instance metadata {metadata.url}/latest/meta-data/spot/instance-action: HTTP 500"
        assert out.count(failed) == 2 and f"node {node['node_id']} drained for preemption" in out, out
        assert time.time() < deadline, "the drain came after the deadline"
        ray.kill(head_held)  # room for the restarted worker (an autoscaler would bring a node)
        on_spot[0].wait(timeout=deadline - time.time() + 60)  # Ray Train stops the worker at the deadline
        stopped = time.time()
        with contextlib.suppress(psutil.NoSuchProcess):
            node["raylet"].kill()  # the reclaim (a drained raylet may have exited at its deadline already)
        trainer.join(timeout=600)
    assert not trainer.is_alive(), "the run did not complete on the head"
    assert stopped >= deadline, (rate, stopped - deadline)  # it trained on until the deadline
    saved = sorted(int(p.name.removeprefix("step-")) for p in (storage / run_name).glob("step-*"))
    assert len(saved) == 2 and saved[1] == steps, saved  # one checkpoint before the end: the just-in-time one
    jit = saved[0]
    assert jit % steps and jit % log_every == 0 and jit > noticed, (jit, noticed)
    summary = result["summary"]
    final = checkpoint.load(summary["checkpoint"])
    assert summary["step"] == final["step"] == steps
    assert all(s["step"] == steps for s in final["optimizer"]["state"].values())  # every step applied once
    runs = client.search_runs([client.get_experiment_by_name(run_name).experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]] and runs[0].info.status == "FINISHED"
    resumed = client.get_metric_history(summary["mlflow_run_id"], "train/resumed_from")
    assert [m.value for m in resumed] == [jit]  # resumed once, from the just-in-time checkpoint
    logged = sorted({m.step for m in client.get_metric_history(summary["mlflow_run_id"], "train/step")})
    assert logged == list(range(log_every, steps + 1, log_every))
