"""Relay load bench: Volli against peerjs-server and a bare flask-sock relay, same load and run.

Run from the repo root:  python bench/relay.py            (every figure, about 3 minutes)
                         python bench/relay.py --quick    (smoke run, about 35 seconds)

For each server (Volli via ./gunicorn.conf.py, the baseline bench/baseline_app.py under the
same gunicorn gevent worker, peerjs-server, npm "peer", with its own node CLI) it starts
the server on a free 127.0.0.1 port, then measures:

1. connections: opens K1 (5,000) registered connections as fast as the lean client
   processes (bench/rawws.py, epoll) can with bounded handshakes in flight, from several
   127.x source addresses: connections/s and server CPU per connection; RSS per idle
   connection at K1; then the same up to K2 (20,000, capped below RLIMIT_NOFILE);
2. throughput: N sender/receiver pairs, each sender keeps at most --window offers in flight
   (closed loop, so no receiver's server-side queue can overflow), lean client; messages
   counted at the receivers inside the measurement window, and the worker's CPU seconds in
   that window (msgs per server CPU-second);
3. latency: the same pairs at a fixed, paced total rate (5,000 msg/s; python-websockets
   client); one-way latency from a time.monotonic_ns() stamp in the payload to its arrival;
4. round trips: one pair, A sends an offer, B answers on receipt, A's send->answer time
   over --rtt-count sequential round trips (two blocking raw connections).

Unless --no-redis, the same run adds Volli servers that share presence through a private
Redis (started on free 127.0.0.1 ports, stopped at the end), measured like
the first (throughput and latency) and reported in the main table (figure 6) and against
the single-worker in-memory Volli:

- redis-1w: one worker with VOLLI_REDIS_URL set; every user is local, so no relay touches
  Redis (the cost of the backend when nothing crosses);
- redis-2w: WEB_CONCURRENCY=2, and every sender/receiver pair is CROSS-worker. gunicorn
  hands connections to workers as they come, so the clients register, the bench reads which
  worker logged each registration ("[<pid>] [INFO] volli.hub: registered user=..."), opens
  more connections if one worker holds too few (bounded), and pairs each sender with a
  receiver on the other worker, half in each direction. Server CPU is both workers plus
  redis-server, also shown apart;
- cluster-2w: the same on a 3-primary Redis Cluster (tests/redis_topologies.py's
  LocalCluster; CPU and INFO commandstats summed over its nodes), so one run gives
  cross-worker figures on one Redis and on a Cluster side by side. --redis-kinds
  (single,cluster) chooses which Redis run.

Every window reports the load generator's CPU next to the server's. peerjs-server is
installed with npm at bench time into bench/.peerjs/ (git-ignored, never committed) unless
it is there at PEERJS_VERSION already; --no-peerjs leaves it out. A small per-server
protocol adapter (Protocol / PeerjsProtocol, and rawws.Target) holds how a client registers
and how offers look. Results go to bench/results/<UTC>-relay.json with machine, versions
and commit. Every loop is bounded in count and time; servers are stopped with SIGTERM, then
SIGKILL, on their process group. See bench/README.md.

The package, bottom up (bench/relay.py is the command):

- protocol: the offer payload and how each server's clients register and relay;
- procfs: CPU and memory of processes, from /proc;
- servers: starting and stopping redis-server (or a Redis Cluster), Volli, the baseline
  and peerjs-server;
- clients: the parent's handle on client processes, and what they share;
- aioclient: the python-websockets client process (paced latency, warm-up);
- leanclient: the bench/rawws.py client process (throughput, connections, round trips);
- runs: the measured phases, driven from the parent, and one round per server;
- report: the tables, the NOISE and PROBLEMS findings;
- cli: the options and main().
"""
