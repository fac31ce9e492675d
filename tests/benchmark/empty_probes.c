// The "empty probes" floor of issue 5 (1a): programs that do nothing, attached to the
// very tracepoints otel-ebpf uses. Whatever they cost is the price of the syscall
// tracepoint design itself (the kernel's tracepoint dispatch and BPF entry/exit), not
// of our programs' work, so traced throughput is compared against this floor.
//
// empty_probes.py appends one `TRACEPOINT_PROBE(category, event) { return 0; }` line
// per tracepoint it finds in bpf/ (the daemon's sources), so this set follows the
// daemon's set. BCC attaches TRACEPOINT_PROBE functions automatically on load.
