"""MLflow's store outlives the machine that serves it (issue 14 item 2): saved to the bucket when the services stop,
restored into a wiped home when they start, as a cluster head's disk is wiped by `ray down`."""

import shutil

import pytest

from scmlab import services


@pytest.mark.slow  # its own SeaweedFS + MLflow, started twice
def test_runs_metrics_and_sweep_parents_survive_a_wiped_server(tmp_path):
    from mlflow import MlflowClient

    home = tmp_path / "home"
    uri = services.services_up(home)["mlflow"]["tracking_uri"]
    try:
        client = MlflowClient(uri)
        experiment = client.create_experiment("survival")
        parent = client.create_run(experiment, run_name="sweep").info.run_id
        children = [client.create_run(experiment, run_name=f"trial-{i}", tags={"mlflow.parentRunId": parent})
                    .info.run_id for i in range(2)]
        for i, run in enumerate(children):
            for step in range(3):
                client.log_metric(run, "loss/mean", 1.0 / (step + 1 + i), step=step)
            client.set_terminated(run)
        client.set_terminated(parent)
    finally:
        services.services_down(home)

    # What `ray down` leaves: the bucket (here the object store's data and its credentials), no server state.
    for name in ("mlflow.db", "mlflow.json", "mlflow.log"):
        (home / name).unlink(missing_ok=True)
    assert not (home / "mlflow.db").exists()
    shutil.rmtree(home / "mlruns", ignore_errors=True)

    uri = services.services_up(home)["mlflow"]["tracking_uri"]
    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("survival")
        assert experiment is not None
        runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
        assert set(runs) == {parent, *children}
        for i, run in enumerate(children):
            assert runs[run].data.tags["mlflow.parentRunId"] == parent
            assert runs[run].info.status == "FINISHED"
            history = client.get_metric_history(run, "loss/mean")
            assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1 + i)) for s in range(3)]
        assert (home / "mlflow.db").stat().st_mode & 0o077 == 0
    finally:
        services.services_down(home)
