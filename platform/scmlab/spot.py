"""EC2 spot interruption notices turned into Ray preemption drains, so a reclaimed node checkpoints before it goes.

AWS announces a spot reclaim about two minutes ahead in the instance metadata (IMDSv2): `spot/instance-action`
answers 404 until then, then `{"action": "terminate" | "stop" | "hibernate", "time": "2026-12-01T12:00:00Z"}`.
No Ray 2.60 component reads it (the v1 autoscaler that `ray up` runs de-registers only the nodes it scales down), so
without this a reclaim is a lost node and the run falls back to its last periodic checkpoint. `watch` polls the
notice on a spot node and drains that node's raylet with reason PREEMPTION and the notice's time as deadline, the
GCS request `ray drain-node` sends: Ray Train's workers then see `ray.train.get_preemption_info`, write a checkpoint
at their next log step (scmlab.train.loop) and are restarted elsewhere at the deadline, counted as a preemption.

The node list and the drain go through `ray._raylet.GcsClient`, as `ray drain-node` does (Ray is pinned, and
tests/test_spot.py drains a real local node through it); the token comes from RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH.
"""

import json
import logging
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

log = logging.getLogger(__name__)

IMDS = "http://169.254.169.254"
TOKEN_TTL_S = 21600  # IMDSv2's longest session token


class Metadata:
    """The instance metadata service, version 2 (a session token on every request; DLAMIs may refuse version 1).
    `get(path)` returns the text, or None where the service answers 404."""

    def __init__(self, url: str = IMDS, timeout: float = 2.0):
        self.url, self.timeout, self._token = url.rstrip("/"), timeout, None

    def _token_now(self) -> str:
        request = urllib.request.Request(f"{self.url}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read().decode()

    def get(self, path: str) -> str | None:
        url = f"{self.url}/latest/meta-data/{path}"
        for attempt in range(2):  # a token that expired (401) is renewed once
            try:
                self._token = self._token or self._token_now()
                request = urllib.request.Request(url, headers={"X-aws-ec2-metadata-token": self._token})
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read().decode()
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                if e.code != 401 or attempt:
                    raise OSError(f"instance metadata {url}: HTTP {e.code} {e.reason}") from e
                self._token = None
            except urllib.error.URLError as e:
                raise OSError(f"instance metadata {url}: {e.reason}") from e


def notice(metadata: Metadata) -> tuple[str, float] | None:
    """The pending interruption as (action, time in epoch seconds), or None when there is none."""
    text = metadata.get("spot/instance-action")
    if text is None:
        return None
    try:
        action = json.loads(text)
        return action["action"], datetime.fromisoformat(action["time"].replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"spot/instance-action: not an interruption notice ({e}): {text[:200]!r}") from e


def node_here(gcs, ip: str) -> str:
    """The hex id of the one alive Ray node whose raylet listens on `ip` (one per EC2 instance)."""
    from ray.core.generated import gcs_pb2

    alive = [info for info in gcs.get_all_node_info().values()
             if info.state == gcs_pb2.GcsNodeInfo.ALIVE and info.node_manager_address == ip]
    if len(alive) != 1:
        raise RuntimeError(f"{len(alive)} alive Ray nodes at {ip} (want one: start the watcher after `ray start`, "
                           "or give --node-id where several nodes share an address)")
    return alive[0].node_id.hex()


def drain(gcs, node_id: str, deadline: float, message: str) -> None:
    """Ask the GCS to drain `node_id` for preemption, force-killed at `deadline` (epoch seconds)."""
    from ray.core.generated import autoscaler_pb2

    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   message, int(deadline * 1000), timeout=30)
    if not accepted:
        raise RuntimeError(f"the drain of node {node_id} was not accepted: {why}")


def watch(address: str, metadata: Metadata | None = None, node_id: str | None = None, every: float = 5.0) -> str:
    """Poll the spot notice every `every` seconds (AWS's advice: 5) until one comes, then drain this node (or
    `node_id`) with the notice's time as deadline. Returns "drained", or "not spot" at once on an instance that AWS
    never reclaims (on-demand), so every node type may start the watcher. A metadata error in the loop, and a GCS
    error while the notice's time has not passed, are retried at the next poll."""
    import ray
    from ray._raylet import GcsClient

    metadata = metadata or Metadata()
    lifecycle = metadata.get("instance-life-cycle")
    if lifecycle != "spot":
        log.info("instance-life-cycle is %s, not spot: nothing to watch", lifecycle)
        return "not spot"
    gcs = GcsClient(address=address)
    log.info("watching %s/latest/meta-data/spot/instance-action every %g s", metadata.url, every)
    while True:
        try:
            pending = notice(metadata)
        except (OSError, ValueError) as e:  # the service down a moment, or an answer not understood: ask again
            log.warning("%s; asking again in %g s", e, every)
            pending = None
        if pending is not None:
            action, deadline = pending
            try:
                node = node_id or node_here(gcs, ray.util.get_node_ip_address())
                drain(gcs, node, deadline, f"spot {action} at {datetime.fromtimestamp(deadline, timezone.utc)}")
                log.warning("spot %s in %.0f s: node %s drained for preemption", action, deadline - time.time(),
                            node)
                return "drained"
            except Exception:
                if time.time() >= deadline:
                    raise
                log.exception("drain failed; trying again in %g s", every)
        time.sleep(every)
