"""TLS on the Dask comm, the dashboard's binding, stores that carry no code, and leases.

Certificates are made for each run by the ``cryptography`` package (test extra): a CA
signing the cluster's certificate, and a second, unrelated CA signing an intruder's.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pickle
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from distributed.comm import connect as comm_connect
from distributed.security import Security

import blockals
from blockals.cluster import connect
from blockals.lock import Lease
from blockals.tls import TLSFiles

x509 = pytest.importorskip("cryptography.x509", reason="certificates are made with cryptography (test extra)")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _certificate(directory: Path, name: str, issuer: tuple | None = None) -> tuple:
    """A key and a certificate for 127.0.0.1, signed by ``issuer`` (key, cert) or self-signed as a CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key, signer = issuer or (key, None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.subject if signer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
    cert = builder.sign(signer_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return key, cert


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    ca = _certificate(directory, "ca")
    _certificate(directory, "cluster", ca)
    _certificate(directory, "intruder", _certificate(directory, "other-ca"))
    return directory


def test_tls_cluster_refuses_clients_without_its_certificate_and_trains_with_it(certificates, tmp_path):
    d = certificates
    files = TLSFiles.parse(str(d / "ca.pem"), str(d / "cluster.pem"), str(d / "cluster.key"))
    frame = blockals.datasets.synthetic_frame(600, 300, 12_000, seed=2)
    store = blockals.ingest(frame, tmp_path / "r.zarr", n_user_blocks=2, n_item_blocks=2)
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": ""}
    tls_options = ["--tls-ca-file", str(d / "ca.pem"), "--tls-cert", str(d / "cluster.pem"), "--tls-key", str(d / "cluster.key")]

    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "blockals.cli", "train", str(store.path), *args], capture_output=True,
                              text=True, timeout=600, env=env)

    with connect(security=files.security(), dashboard_address="127.0.0.1:0") as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert client.dashboard_link.startswith("http://127.0.0.1:")

        # Connection attempts on the client's own event loop (each Client would start another).
        def attempt(addr: str, **connection_args) -> None:
            comm = client.sync(comm_connect, addr, timeout="3s", **connection_args)
            client.sync(comm.close)

        attempt(address, **files.security().get_connection_args("client"))  # the cluster's certificate: admitted
        trusting = ssl.create_default_context(cafile=str(d / "ca.pem"))
        trusting.check_hostname = False
        intruders = [
            Security().get_connection_args("client"),  # no TLS at all
            {"ssl_context": trusting},  # TLS trusting the cluster's CA, but presenting no certificate
            # A certificate, and the cluster's CA to check the scheduler's, but signed by another CA.
            Security(require_encryption=True, tls_ca_file=str(d / "ca.pem"), tls_client_cert=str(d / "intruder.pem"),
                     tls_client_key=str(d / "intruder.key")).get_connection_args("client"),
        ]
        for connection_args in intruders:
            with pytest.raises((OSError, TypeError)):
                attempt(address, **connection_args)
        with pytest.raises(OSError):  # nor in clear text
            attempt(address.replace("tls://", "tcp://"))

        refused = train(str(tmp_path / "refused.zarr"), "--scheduler", address)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"cannot connect to the Dask scheduler at {address}" in refused.stderr.strip().splitlines()[-1]

        done = train(str(tmp_path / "m.zarr"), "--scheduler", address, *tls_options, "--rank", "4", "--max-iter", "3",
                     "--dtype", "float64")
        assert done.returncode == 0, done.stderr[-2000:]
        assert client.run_on_scheduler(lambda dask_scheduler: "blockals-solve-users" in dask_scheduler.task_prefixes)

    model = blockals.ALS.load(tmp_path / "m.zarr")
    # The RMSE the training reported, recomputed from the saved factors and the source.
    users = model.user_factors_[model.user_ids_.searchsorted(frame["user"])]
    items = model.item_factors_[model.item_ids_.searchsorted(frame["item"])]
    rmse = np.sqrt(np.mean((np.einsum("ij,ij->i", users, items) - frame["rating"].to_numpy()) ** 2))
    assert model.history_[-1]["train_rmse"] == pytest.approx(rmse, rel=1e-6)
    assert model.history_[-1]["loss"] < model.history_[0]["loss"]


def test_cli_starts_a_tls_cluster_with_its_dashboard_where_asked(certificates, tmp_path):
    d = certificates
    store = blockals.ingest(blockals.datasets.synthetic_frame(300, 200, 5_000, seed=3), tmp_path / "r.zarr")
    done = subprocess.run(
        [sys.executable, "-m", "blockals.cli", "--log-level", "INFO", "train", str(store.path), str(tmp_path / "m.zarr"),
         "--rank", "3", "--max-iter", "2", "--dashboard-address", "127.0.0.1:0", "--tls-ca-file", str(d / "ca.pem"),
         "--tls-cert", str(d / "cluster.pem"), "--tls-key", str(d / "cluster.key")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "DASK_SCHEDULER_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "at tls://127.0.0.1:" in done.stderr  # the LocalCluster's log line
    assert "dashboard: http://127.0.0.1:" in done.stdout and ":8787/" not in done.stdout
    assert blockals.ALS.load(tmp_path / "m.zarr").history_[-1]["iteration"] == 2


@pytest.mark.parametrize("files,message", [
    (("{ca}", None, None), "TLS needs both --tls-ca-file and --tls-cert"),
    (("{ca}", "{missing}", None), "--tls-cert {missing} is not a file"),
    (("{ca}", "{ca}", "{ca}"), "cannot be loaded"),  # a certificate where the key should be
])
def test_bad_tls_options_get_one_sentence(files, message, certificates, tmp_path):
    fill = {"ca": str(certificates / "ca.pem"), "missing": str(tmp_path / "nope.pem")}
    files = [f and f.format(**fill) for f in files]
    with pytest.raises(blockals.InputError, match="^[^\\n]*$") as refused:
        tls = TLSFiles.parse(*files)
        tls.security()
    assert message.format(**fill) in str(refused.value)


def test_cli_refuses_bad_tls_options_before_training(certificates, tmp_path):
    store = blockals.ingest(blockals.datasets.synthetic_frame(100, 50, 1_000, seed=1), tmp_path / "r.zarr")
    done = subprocess.run([sys.executable, "-m", "blockals.cli", "train", str(store.path), str(tmp_path / "m.zarr"),
                           "--tls-ca-file", str(certificates / "ca.pem")], capture_output=True, text=True, timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "TLS needs both" in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "m.zarr").exists()


class _Payload:
    """Unpickling this creates the file ``canary``: proof that code from a store ran."""

    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self):
        return (open, (self.canary, "w"))


def _plant_pickle(array_dir: Path, canary: Path) -> None:
    """Make a stored array's metadata name a pickle codec, and its chunk a pickle payload."""
    meta = json.loads((array_dir / "zarr.json").read_text())
    meta["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "numcodecs.pickle"}]
    (array_dir / "zarr.json").write_text(json.dumps(meta))
    for chunk in (array_dir / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(pickle.dumps(_Payload(str(canary))))


def test_a_store_or_model_with_a_planted_pickle_is_refused_without_running_it(tmp_path, client2):
    canary = tmp_path / "ran"
    frame = blockals.datasets.synthetic_frame(200, 100, 2_000, seed=5)
    store = blockals.ingest(frame, tmp_path / "r.zarr", n_user_blocks=2, n_item_blocks=2)
    model = blockals.ALS(rank=2, max_iter=1).fit(store, client2)
    model.save(tmp_path / "m.zarr")
    _plant_pickle(tmp_path / "r.zarr" / "users" / "block", canary)
    _plant_pickle(tmp_path / "m.zarr" / "user_factors", canary)

    with pytest.raises(blockals.StoreError, match="users/block cannot be read"):
        blockals.open_store(tmp_path / "r.zarr").assignment("users")
    with pytest.raises(blockals.StoreError, match="m.zarr cannot be read .Unknown codec: .numcodecs.pickle"):
        blockals.ALS.load(tmp_path / "m.zarr")
    assert not canary.exists()
    pickle.loads(pickle.dumps(_Payload(str(canary))))  # the payload is live: unpickled, it does run
    assert canary.exists()


def test_lease_is_exclusive_across_threads_and_free_once_its_holder_dies(tmp_path):
    path = str(tmp_path / "m.zarr")
    refusals = []

    def another_thread():
        try:
            with Lease(path, "model"):
                pass
        except blockals.StoreError as exc:
            refusals.append(str(exc))

    with Lease(path, "model"):
        with Lease(path, "model"):  # the same thread again: blockals train, then ALS.save
            pass
        thread = threading.Thread(target=another_thread)
        thread.start()
        thread.join()
        assert (tmp_path / "m.zarr.lock").exists()
    assert len(refusals) == 1 and f"model {path} is being written by another process (process {os.getpid()} " in refusals[0]
    assert not (tmp_path / "m.zarr.lock").exists()

    # A holder killed with SIGKILL leaves its file, and the lease is free at once.
    holder = subprocess.run([sys.executable, "-c", f"import os, signal\nfrom blockals.lock import Lease\n"
                             f"Lease({path!r}, 'model').acquire()\nos.kill(os.getpid(), signal.SIGKILL)"], timeout=120)
    assert holder.returncode == -9 and (tmp_path / "m.zarr.lock").exists()
    with Lease(path, "model"):
        pass


def test_lease_on_s3_is_refused_until_broken(tmp_path):
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "eu-west-1"}}
        s3fs.S3FileSystem(**options).mkdir("blockals-lease")
        path = "s3://blockals-lease/model.zarr"
        dead = Lease(path, "model", options)
        dead.acquire()  # never released here: a driver that died holding it

        outcome: dict[str, object] = {}

        def elsewhere():  # another thread stands for another process: it does not share the lease
            try:
                Lease(path, "model", options).acquire()
            except blockals.StoreError as exc:
                outcome["refused"] = str(exc)
            taker = Lease(path, "model", options, break_lease=True)
            taker.acquire()
            outcome["taker"] = taker

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert "pass break_lease=True (--break-lease) or delete s3://blockals-lease/model.zarr.lock" in outcome["refused"]
        fs = s3fs.S3FileSystem(**options)
        fs.invalidate_cache()
        dead.release()  # the old holder, back: it must not delete the lease it lost
        assert outcome["taker"].holder.token in fs.cat_file("blockals-lease/model.zarr.lock/exclusive").decode()
    finally:
        server.stop()
