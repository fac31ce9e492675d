"""TLS for both transports: the collector's CA from `certificate`, mutual TLS with
`client_key` / `client_certificate`. Test doubles for the collector (a TLS HTTP server,
a gRPC server with a generic handler); the certificates are made by the openssl CLI."""

from __future__ import annotations

import gzip
import logging
import ssl
import subprocess
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from otel_ebpf.export import OtlpExporter, OtlpOptions, OtlpSignalOptions
from otel_ebpf.stats import Stats

TRACE_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
         "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return str(d / "cert.pem"), str(d / "key.pem")


@pytest.fixture
def https_collector(certs):
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*certs)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "https://localhost:%d/v1/traces" % server.server_address[1], received
    server.shutdown()
    server.server_close()


def test_https_with_the_collectors_ca(https_collector, certs):
    url, received = https_collector
    stats = Stats()
    sig = OtlpSignalOptions(protocol="http/protobuf", endpoint=url, certificate=certs[0],
                            compression="gzip")
    ex = OtlpExporter(OtlpOptions(traces=sig, metrics=sig), stats)
    ex.export_traces(b"\x0a\x00", 1)
    assert ex.force_flush(10)
    ex.shutdown(2)
    assert [gzip.decompress(b) for b in received] == [b"\x0a\x00"]
    assert stats.get("export.payloads_sent") == 1


def test_https_with_an_untrusted_certificate_fails_at_once_with_a_hint(https_collector, caplog):
    url, received = https_collector
    stats = Stats()
    sig = OtlpSignalOptions(protocol="http/protobuf", endpoint=url)  # system CAs only
    ex = OtlpExporter(OtlpOptions(traces=sig, metrics=sig), stats)
    with caplog.at_level(logging.WARNING, logger="otel_ebpf.export"):
        ex.export_traces(b"\x0a\x00", 1)
        assert ex.force_flush(10)
    ex.shutdown(2)
    assert received == []
    assert stats.get("export.failures") == 1
    assert stats.get("export.retries") == 0  # a trust problem is not retried
    assert "check export.otlp certificate" in caplog.text


def test_grpc_mutual_tls_metadata_and_gzip(certs):
    cert, key = certs
    received: list[tuple[bytes, dict]] = []

    def export(request: bytes, context) -> bytes:
        received.append((request, dict(context.invocation_metadata())))
        return b""

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)},  # identity (de)serializers
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    with open(cert, "rb") as f:
        cert_bytes = f.read()
    with open(key, "rb") as f:
        key_bytes = f.read()
    creds = grpc.ssl_server_credentials([(key_bytes, cert_bytes)], root_certificates=cert_bytes,
                                        require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        stats = Stats()
        sig = OtlpSignalOptions(protocol="grpc", endpoint="https://localhost:%d" % port,
                                certificate=cert, client_key=key, client_certificate=cert,
                                headers=(("X-Api-Key", "k1"),), compression="gzip")
        ex = OtlpExporter(OtlpOptions(traces=sig, metrics=sig), stats)
        ex.export_traces(b"\x0a\x00", 1)
        assert ex.force_flush(10)
        ex.shutdown(2)
        # Without the client certificate the server refuses the handshake.
        bad = OtlpSignalOptions(protocol="grpc", endpoint="https://localhost:%d" % port,
                                certificate=cert)
        stats_bad = Stats()
        ex_bad = OtlpExporter(OtlpOptions(traces=bad, metrics=bad, retry_max_elapsed_s=0.5,
                                          retry_initial_backoff_s=0.05), stats_bad)
        ex_bad.export_traces(b"\x0a\x01", 1)
        assert ex_bad.force_flush(10)
        ex_bad.shutdown(2)
    finally:
        server.stop(0)
    assert [r for r, _ in received] == [b"\x0a\x00"]
    assert received[0][1]["x-api-key"] == "k1"  # gRPC metadata keys are lower case
    assert received[0][1]["user-agent"].startswith("otel-ebpf/")
    assert stats.get("export.payloads_sent") == 1
    assert stats_bad.get("export.failures") == 1 and stats_bad.get("export.payloads_sent") == 0
