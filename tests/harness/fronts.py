"""What stands in front of a harness server in a company network, on free loopback ports:

- TlsFront: HTTPS in front of a plain-HTTP server (SeaweedFS's S3 port), with a certificate from a private CA
  made for the test (make_private_ca); bytes pass through as they are, so S3 signatures (over Host) stay valid.
- ForwardProxy: an HTTP forward proxy (what HTTP_PROXY / HTTPS_PROXY name): CONNECT tunnels, and absolute-form
  requests passed on to the host they name (servers accept the absolute form, RFC 9112 3.2.2).

Both run on one asyncio loop thread each: asyncio's TLS uses memory BIOs, where ssl sockets shared by two pump
threads would not do (OpenSSL does not allow one connection's reads and writes from two threads at once).
"""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

from .ports import free_port


def make_private_ca(workdir: Path) -> dict[str, Path]:
    """A CA and a server certificate it signs for 127.0.0.1 / localhost, as PEM files under workdir:
    {"ca": ca.pem, "cert": server.pem, "key": server-key.pem}. (rustls, the native client's TLS, refuses a CA
    certificate used as the server's own, and a certificate without subjectAltName: hence two certificates.)"""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    workdir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prefetch test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": workdir / "ca.pem", "cert": workdir / "server.pem", "key": workdir / "server-key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


class _LoopServer:
    """A TCP server on 127.0.0.1:<free port> whose connections are served by the subclass's `_connection`
    coroutine, on a loop thread."""

    def __init__(self):
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None

    def start(self):
        self.port = free_port()
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
            ready.set()

        def run() -> None:
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name=type(self).__name__)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop

        async def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = None


async def _splice(a_reader, a_writer, b_reader, b_writer) -> None:
    """Pass bytes both ways until either side closes."""
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(1 << 20):
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError, ssl.SSLError):
            pass
        finally:
            dst.close()

    await asyncio.gather(pump(a_reader, b_writer), pump(b_reader, a_writer))


class TlsFront(_LoopServer):
    """https://127.0.0.1:<port> in front of upstream_host:upstream_port (plain TCP).

    stats() -> {"handshakes": TLS handshakes completed, "refused": connections whose handshake failed (a client
    that did not trust the certificate)}."""

    def __init__(self, upstream_host: str, upstream_port: int, certfile: Path, keyfile: Path):
        super().__init__()
        self.upstream = (upstream_host, int(upstream_port))
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(certfile), str(keyfile))
        self._handshakes = 0
        self._refused = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, int]:
        return {"handshakes": self._handshakes, "refused": self._refused}

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:   # the handshake by hand after accepting (not start_server(ssl=...)), so a refused one is counted
            await writer.start_tls(self.context)
        except (ssl.SSLError, OSError, ConnectionError):
            self._refused += 1
            writer.close()
            return
        self._handshakes += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await _splice(reader, writer, up_reader, up_writer)


class ForwardProxy(_LoopServer):
    """http://127.0.0.1:<port>, an HTTP forward proxy. Each connection's first request names where it goes:
    `CONNECT host:port` (answered 200, then a tunnel) or `METHOD http://host:port/... HTTP/1.1` (passed on as it
    is, with what follows on that connection).

    stats() -> {"connections": connections passed on to a server, "first_lines": [(method, "host:port"), ...]
    of each one's first request}."""

    def __init__(self):
        super().__init__()
        self._first_lines: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        return {"connections": len(self._first_lines), "first_lines": list(self._first_lines)}

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        hostport = target if method == "CONNECT" else urlsplit(target).netloc
        host, _, port = hostport.rpartition(":")
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        self._first_lines.append((method, hostport))
        if method == "CONNECT":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            up_writer.write(head)
        await _splice(reader, writer, up_reader, up_writer)
