"""bpf/protocol_infer.h compiled with gcc and run on byte strings: what the kernel's
protocol inference says about a stream's first bytes (HTTP/1.x, HTTP/2, not HTTP, too
short to say), without loading anything into a kernel."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NO, PREFIX, HTTP1, HTTP2 = 0, 1, 2, 3

SETTINGS_GO = bytes.fromhex("000018040000000000")  # 4 settings, as grpc-go writes them
CASES = [
    # (first bytes, settings allowed, expected)
    (b"GET / HTTP/1.1\r\n", 0, HTTP1),
    (b"HTTP/1.1 200 OK\r\n", 1, HTTP1),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0, HTTP2),
    (b"PRI * HT", 0, HTTP2),  # decided on 8 bytes
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 1, HTTP2),
    (b"PRI", 0, PREFIX),
    (b"P", 0, PREFIX),
    (b"PRI * HX", 0, NO),
    (SETTINGS_GO, 1, HTTP2),
    (bytes.fromhex("000006040000000000"), 1, HTTP2),  # nghttpd: one setting
    (bytes.fromhex("000000040000000000"), 1, HTTP2),  # empty SETTINGS: all defaults
    (SETTINGS_GO, 0, NO),  # not where a server's bytes go: too weak a pattern
    (bytes.fromhex("000007040000000000"), 1, NO),  # length not a multiple of 6
    (bytes.fromhex("000018040100000000"), 1, NO),  # flags ACK: not a first SETTINGS
    (bytes.fromhex("000018040000000001"), 1, HTTP2),  # 9th byte (stream id low) unread
    (bytes.fromhex("000018040000000100"), 1, NO),  # stream id != 0
    (bytes.fromhex("000118040000000000"), 1, NO),  # >= 256 bytes of settings
    (bytes.fromhex("000006010400000001"), 1, NO),  # a HEADERS frame
    (bytes.fromhex("0000"), 1, PREFIX),
    (bytes.fromhex("000018"), 1, PREFIX),
    (bytes.fromhex("000019"), 1, NO),
    (bytes.fromhex("16030100a5010000a103"), 1, NO),  # a TLS ClientHello
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", 1, NO),  # PostgreSQL SSLRequest
    (b"SSH-2.0-OpenSSH_9.2", 1, NO),
]


@pytest.fixture(scope="module")
def infer(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("gcc is needed to check bpf/protocol_infer.h (apt-get install gcc)")
    work = tmp_path_factory.mktemp("infer")
    src = work / "infer.c"
    src.write_text("\n".join([
        "#include <stdio.h>", "#include <stdlib.h>", "#include <string.h>",
        "#include <linux/types.h>", "#ifndef __always_inline", "#define __always_inline inline", "#endif",
        '#include "%s"' % (ROOT / "bpf" / "include" / "events.h"),
        '#include "%s"' % (ROOT / "bpf" / "protocol_infer.h"),
        # argv: settings, hex bytes; prints infer_proto() of the first min(n, 8) bytes
        "int main(int argc, char **argv) {",
        "  int settings = atoi(argv[1]); const char *h = argv[2];",
        "  __u32 n = strlen(h) / 2; __u64 v = 0;",
        "  for (__u32 i = 0; i < n && i < 8; i++) { unsigned b; sscanf(h + 2 * i, \"%2x\", &b);",
        "    v |= (__u64)b << (8 * i); }",
        "  printf(\"%d\\n\", infer_proto(v, n < 8 ? n : 8, settings)); return 0; }",
    ]) + "\n")
    exe = work / "infer"
    subprocess.run([gcc, "-Wall", "-Werror", "-Wno-unused-function", "-Wno-unknown-pragmas", "-o", str(exe), str(src)],
                   check=True)

    def run(data: bytes, settings: int) -> int:
        out = subprocess.run([str(exe), str(settings), data.hex()], check=True,
                             capture_output=True, text=True).stdout
        return int(out)
    return run


@pytest.mark.parametrize("data,settings,expected", CASES)
def test_infer_proto(infer, data, settings, expected):
    assert infer(data, settings) == expected


def test_every_prefix_of_the_preface_is_still_possible(infer):
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    for n in range(1, 8):
        assert infer(preface[:n], 0) == PREFIX, preface[:n]
    assert infer(preface[:8], 0) == HTTP2
