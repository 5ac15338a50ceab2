"""TLS between agent and collector, with real processes: a throwaway CA, a
server certificate for 127.0.0.1/localhost and a client certificate. The
agent trusts the collector only through ``[agent] ca_bundle``; without it
the replay fails and nothing reaches the collector (no plain-HTTP fallback).
With ``[collector] tls_client_ca`` the collector wants a client certificate
(mutual TLS): an agent without one is refused, one with it delivers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import fleet, procs

try:
    import cryptography  # noqa: F401

    HAVE_CRYPTOGRAPHY = True
except ImportError:
    HAVE_CRYPTOGRAPHY = False

pytestmark = pytest.mark.skipif(
    not HAVE_CRYPTOGRAPHY and shutil.which("openssl") is None,
    reason="needs the cryptography package or the openssl CLI to make certificates",
)


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


# ------------------------------------------------------------------ certificates


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _pki_openssl(d: Path) -> Pki:
    ca, ca_key = str(d / "ca.pem"), str(d / "ca.key")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=rarewrite test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip

    def leaf(name: str, ext: str) -> tuple[str, str]:
        cert, key, csr, cnf = (str(d / f"{name}.{s}") for s in ("pem", "key", "csr", "ext"))
        Path(cnf).write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n{ext}\n"
        )
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", cnf,
        )  # fmt: skip
        return cert, key

    server = leaf("localhost", "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1")
    client = leaf("agent", "extendedKeyUsage=clientAuth")
    return Pki(ca, *server, *client)


def _pki_cryptography(d: Path) -> Pki:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
        cert_path, key_path = d / f"{stem}.pem", d / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return str(cert_path), str(key_path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("rarewrite test CA"))
        .issuer_name(name("rarewrite test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    ca_path, _ = save("ca", ca_cert, ca_key)

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        )  # fmt: skip
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return save(cn, b.sign(ca_key, hashes.SHA256()), key)

    server = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = leaf("agent", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return Pki(ca_path, *server, *client)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    return _pki_cryptography(d) if HAVE_CRYPTOGRAPHY else _pki_openssl(d)


# ------------------------------------------------------------------ processes


@dataclass
class TlsCollector:
    url: str
    db: str
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, ca: str) -> str:
        ctx = ssl.create_default_context(cafile=ca)
        with urllib.request.urlopen(self.url + path, timeout=5, context=ctx) as r:  # noqa: S310 - loopback
            return str(r.read().decode())


@contextlib.contextmanager
def _collector(tmp: Path, pki: Pki, client_ca: str = "") -> Iterator[TlsCollector]:
    port = procs.free_port()
    conf = tmp / f"collector-{port}.conf"
    conf.write_text(
        f"[collector]\ntls_cert = {pki.server_cert}\ntls_key = {pki.server_key}\n"
        + (f"tls_client_ca = {client_ca}\n" if client_ca else "")
    )
    db, log = str(tmp / f"collector-{port}.db"), tmp / f"collector-{port}.log"
    env = {**os.environ, "RAREWRITE_ENROLLMENT_SECRET": procs.SECRET}
    with open(log, "wb") as out:
        argv = [*procs.RAREWRITE, "collector", "serve", "--listen", f"127.0.0.1:{port}", "--db", db]
        p = subprocess.Popen(
            [*argv, "--config", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    c = TlsCollector(f"https://127.0.0.1:{port}", db, p, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("collector did not come up: " + log.read_text()[-2000:])
            try:
                if not client_ca and c.get("/healthz", pki.ca) == "ok\n":
                    break
            except OSError:
                pass
            if client_ca and "event=listening" in log.read_text():
                break
            time.sleep(0.1)
        yield c
    finally:
        procs.stop(p, signal.SIGTERM)


def _replay(
    tmp: Path, events: str, c: TlsCollector, f: fleet.Fleet, tag: str, agent_conf: str
) -> tuple[int, str]:
    """`agent replay` over TLS with an own state dir: (exit code, stderr)."""
    conf = tmp / f"agent-{tag}.conf"
    conf.write_text("[agent]\nrequest_timeout = 1s\nbackoff_max = 1s\n" + agent_conf)
    r = procs.run(
        [
            "agent", "replay", "--events", events, "--collector", c.url, "--config", str(conf),
            "--state-dir", str(tmp / f"state-{tag}"), "--agent-id", f.agents[0], "--host-name", f.hosts[0],
        ],
        timeout=60,
    )  # fmt: skip
    return r.returncode, r.stderr


def _fleet(tmp: Path) -> tuple[fleet.Fleet, str]:
    f = fleet.generate(11, n_agents=1, n_pairs=15, noise=5, at_ms=time.time_ns() // 1_000_000)
    return f, f.write(str(tmp / "fleet"))[0]


def _rows(c: TlsCollector, f: fleet.Fleet) -> set[tuple[object, ...]]:
    return {fleet.row_tuple(x) for x in procs.evaluate(c.db, f.at_ms)}


# ------------------------------------------------------------------ tests


def test_agent_trusts_the_collector_only_through_its_ca_bundle(pki: Pki, tmp_path: Path) -> None:
    f, events = _fleet(tmp_path)
    with _collector(tmp_path, pki) as c:
        # System trust only: the handshake fails, the replay fails, nothing arrives.
        code, err = _replay(tmp_path, events, c, f, "system-trust", "")
        assert code != 0, err[-2000:]
        assert "CERTIFICATE_VERIFY_FAILED" in err and "records left" in err, err[-2000:]
        assert "HTTPConnectionPool" not in err  # every attempt was HTTPS: no plaintext fallback
        assert not (tmp_path / "state-system-trust" / "api_key").exists()  # never enrolled
        assert _rows(c, f) == set()
        text = c.get("/metrics", pki.ca)
        assert 'batches_total{status="stored"} 0' in text and "rejects_total{" not in text, text
        assert "enrolled" not in c.log.read_text()
        # A bundle that holds some other CA does not help either.
        other = tmp_path / "other-ca.pem"
        other.write_text(Path(pki.client_cert).read_text())
        code, err = _replay(tmp_path, events, c, f, "wrong-ca", f"ca_bundle = {other}\n")
        assert code != 0 and _rows(c, f) == set(), err[-2000:]
        # The test CA: delivered, rows exactly the query's.
        code, err = _replay(tmp_path, events, c, f, "ca", f"ca_bundle = {pki.ca}\n")
        assert code == 0, err[-2000:]
        assert _rows(c, f) == fleet.oracle_rows(f)


def test_mutual_tls_refuses_an_agent_without_a_client_certificate(pki: Pki, tmp_path: Path) -> None:
    f, events = _fleet(tmp_path)
    with _collector(tmp_path, pki, client_ca=pki.ca) as c:
        code, err = _replay(tmp_path, events, c, f, "no-cert", f"ca_bundle = {pki.ca}\n")
        assert code != 0 and "records left" in err, err[-2000:]
        # TLS 1.3: the server's alert comes after the handshake, so the client may see a closed connection
        assert any(m in err for m in ("SSLError", "RemoteDisconnected", "ConnectionResetError")), err[-2000:]
        assert "HTTPConnectionPool" not in err
        assert not (tmp_path / "state-no-cert" / "api_key").exists()
        assert _rows(c, f) == set()
        with_cert = f"ca_bundle = {pki.ca}\nclient_cert = {pki.client_cert}\nclient_key = {pki.client_key}\n"
        code, err = _replay(tmp_path, events, c, f, "cert", with_cert)
        assert code == 0, err[-2000:]
        assert _rows(c, f) == fleet.oracle_rows(f)
