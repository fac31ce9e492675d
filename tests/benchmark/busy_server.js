// A server whose handler burns ~1 ms of CPU per request: the "real handler" case of
// issue 5 (1b). Node.js `http` (libuv; responses go out with writev), keep-alive.
// usage: node busy_server.js PORT [WORK_US]
"use strict";
const http = require("http");
const port = parseInt(process.argv[2], 10);
const workNs = BigInt(parseInt(process.argv[3] || "1000", 10)) * 1000n;
const body = Buffer.from("done\n");

http.createServer((req, res) => {
  // Busy-wait on the monotonic clock rather than a fixed loop count, so the work is
  // ~1 ms whatever the CPU speed.
  const until = process.hrtime.bigint() + workNs;
  let x = 0;
  while (process.hrtime.bigint() < until) { x += 1; }
  res.writeHead(200, { "Content-Type": "text/plain", "Content-Length": body.length });
  res.end(body);
}).listen(port, "127.0.0.1");
