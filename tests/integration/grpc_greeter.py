"""A real gRPC server and client on grpcio, run as separate processes by the
integration tests.

    python tests/integration/grpc_greeter.py serve PORT
    python tests/integration/grpc_greeter.py call PORT PLAN   (PLAN: "SayHello:11,Crash:2")

No generated code: the messages are raw bytes (what the wire carries anyway, behind
the 5-byte gRPC prefix) and grpcio's generic handlers name the service and methods, so
no protoc step is needed. Service `helloworld.Greeter`:

  SayHello      unary: "hello " + request                        -> OK
  ListFeatures  server streaming: int(request) responses          -> OK
  RecordRoute   client streaming: one response per stream         -> OK
  Lookup        unary, aborts with NOT_FOUND (a caller's error)
  Crash         unary, aborts with INTERNAL (a server error)
  Slow          unary, sleeps 2 s: the client's 0.3 s deadline expires first

The client runs the plan sequentially on one channel (one HTTP/2 connection) and
prints one JSON line per call: {"method": ..., "code": "OK" | "NOT_FOUND" | ...}.
ListFeatures returns STREAM_MESSAGES responses, RecordRoute sends CLIENT_STREAM_MESSAGES.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

SERVICE = "helloworld.Greeter"
STREAM_MESSAGES = 5  # ListFeatures responses and RecordRoute requests per call
CLIENT_STREAM_MESSAGES = 7


def _say_hello(request: bytes, context) -> bytes:
    return b"hello " + request


def _list_features(request: bytes, context):
    for i in range(int(request)):
        yield b"feature %d" % i


def _record_route(requests, context) -> bytes:
    return b"%d points" % sum(1 for _ in requests)


def _lookup(request: bytes, context) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def _crash(request: bytes, context) -> bytes:
    context.abort(grpc.StatusCode.INTERNAL, "it broke")


def _slow(request: bytes, context) -> bytes:
    time.sleep(2.0)
    return b"late"


def serve(port: int) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    handlers = {
        "SayHello": grpc.unary_unary_rpc_method_handler(_say_hello),
        "ListFeatures": grpc.unary_stream_rpc_method_handler(_list_features),
        "RecordRoute": grpc.stream_unary_rpc_method_handler(_record_route),
        "Lookup": grpc.unary_unary_rpc_method_handler(_lookup),
        "Crash": grpc.unary_unary_rpc_method_handler(_crash),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port("127.0.0.1:%d" % port)
    server.start()
    server.wait_for_termination()


def call(port: int, plan: str) -> None:
    with grpc.insecure_channel("127.0.0.1:%d" % port) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        for step in plan.split(","):
            method, _, times = step.partition(":")
            path = "/%s/%s" % (SERVICE, method)
            for i in range(int(times or 1)):
                try:
                    if method == "ListFeatures":
                        stub = channel.unary_stream(path)
                        assert len(list(stub(b"%d" % STREAM_MESSAGES, timeout=10))) == \
                            STREAM_MESSAGES
                    elif method == "RecordRoute":
                        stub = channel.stream_unary(path)
                        stub(iter([b"p"] * CLIENT_STREAM_MESSAGES), timeout=10)
                    else:
                        stub = channel.unary_unary(path)
                        stub(b"world %d" % i, timeout=0.3 if method == "Slow" else 10)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                print(json.dumps({"method": method, "code": code}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        call(int(sys.argv[2]), sys.argv[3])
