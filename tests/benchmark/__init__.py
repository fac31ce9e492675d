"""The otel-ebpf benchmark harness (issue 5): `python -m tests.benchmark [--quick]`.

Contract: starts real peers on loopback (nginx, a Node.js server burning ~1 ms of CPU
per request, wrk, the rotel OTLP receiver, `otel-ebpf run` itself and a floor of empty
BPF programs on the daemon's own tracepoints), measures the four things issue 5 asks
for (with the targets of issues 9 and 10), interleaved and repeated, and prints one
table plus a JSON file under bench-results/. It asserts nothing about speed: the numbers are compared with the
issue's targets in the table ("meets"/"MISSES") and the JSON, never turned into a
test failure. Everything it starts it stops, also on Ctrl-C.

Sections:
  overhead   nginx static file (untraced / empty probes / traced exporting nothing /
             traced over OTLP; exchanges seen vs. nginx's own request count, fast-path
             share) and the 1 ms CPU server (untraced / traced): throughput and p50/p99
             latency ratios from wrk --latency
  capacity   a ladder of offered loads with the daemon pinned to one CPU: highest
             sustained exchanges/s with zero loss, CPU us per exchange summed over every
             daemon process, fast-path share, wake-ups and records per wake-up, and a
             deliberate stall showing that loss, once it happens, is counted
  memory     RSS of every daemon process idle, with 10,000 open keep-alive connections,
             and sampled over one million exchanges (slope = growth); start-up peak and
             time to ready; libLLVM/libclang mappings; SIGTERM -> exit under load
  freshness  exchange end -> span arrival at the receiver (p50/p99), default batching
"""
