"""KernelExchangeDecoder behind daemon.reported_only: discovery's verdict is kept per
connection, and a pid that discovery judges again (forgotten by the resolver after an
exec, swept, evicted) has its next exchanges judged by the new verdict."""

from __future__ import annotations

import ctypes

from otel_ebpf.capture import reader
from otel_ebpf.capture.events import EventKind
from otel_ebpf.daemon import reported_only
from otel_ebpf.discovery import Discovery, DiscoveryOptions, parse_selectors
from otel_ebpf.process import ProcessResolver
from otel_ebpf.protocols.http1.kernel_exchange import KernelExchangeDecoder
from otel_ebpf.stats import Stats
from tests.unit.test_kernel_exchange import pack_exchange

GONE = 2 ** 22 + 4321  # above any pid_max: never a live process, known by its name only
HEAD = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


def pipeline():
    stats = Stats()
    discovery = Discovery(DiscoveryOptions(
        instrument=parse_selectors([{"exe_name": "curl"}], "discovery.instrument"),
        default_exclude_instrument=()))
    processes = ProcessResolver(stats, discovery=discovery)
    lookups = []
    get = processes.get
    processes.get = lambda pid: lookups.append(pid) or get(pid)  # counts the verdicts
    out = []
    emit = reported_only(out.append, processes, discovery, stats)
    decoder = KernelExchangeDecoder(emit, stats, clock_offset_ns=0)
    rr = reader.RingReader(lambda event: None, stats, {EventKind.EXCHANGE: decoder.on_record})

    def feed(n: int, fd: int = 7) -> None:
        for _ in range(n):
            raw = pack_exchange(HEAD, tgid=GONE, tid=GONE, fd=fd)
            buf = ctypes.create_string_buffer(raw, len(raw))
            rr.callback(None, ctypes.addressof(buf), len(raw))

    return stats, processes, decoder, out, feed, lookups


def test_a_rejudged_pid_switches_to_its_new_verdict():
    stats, processes, decoder, out, feed, lookups = pipeline()
    processes.note_name(GONE, "curl")
    feed(3)
    assert len(out) == 3 and all(ex.pid == GONE for ex in out)
    assert len(lookups) == 1  # judged once for the connection, then kept

    # The pid now runs another program: the daemon forgets it (as _rejudge_execs does),
    # and its next event names it again.
    processes.forget(GONE)
    processes.note_name(GONE, "wget")
    feed(2)
    feed(1, fd=8)  # another connection of the same pid
    assert len(out) == 3
    assert stats.snapshot()["discovery.dropped_exchanges"] == 3

    processes.forget(GONE)
    processes.note_name(GONE, "curl")
    feed(2)
    feed(1, fd=8)
    assert len(out) == 6
    assert stats.snapshot()["discovery.dropped_exchanges"] == 3
    assert decoder.exchanges == 9  # dropped ones were exchanges too (http.exchanges)


def test_a_pid_swept_from_the_resolver_is_judged_again():
    stats, processes, decoder, out, feed, lookups = pipeline()
    processes.note_name(GONE, "wget")
    feed(2)
    assert out == [] and stats.snapshot()["discovery.dropped_exchanges"] == 2
    # Gone from the cache without the daemon saying so (sweep, eviction): the kept
    # verdict rests on a ProcessInfo the resolver no longer holds.
    processes._cache.clear()
    processes.note_name(GONE, "curl")
    feed(1)
    assert len(out) == 1


def test_unknown_processes_follow_decide_unknown_each_time():
    stats, processes, decoder, out, feed, lookups = pipeline()
    feed(2)  # nothing known about GONE: only selected processes are wanted, dropped
    assert out == [] and stats.snapshot()["discovery.dropped_exchanges"] == 2
    processes.note_name(GONE, "curl")  # now known by its name: reported
    feed(1)
    assert len(out) == 1
