"""Property-based fuzzing of a live server (hypothesis).

One gunicorn server per backend, two honest clients relaying numbered offers, answers and
ICE candidates to each other, and one fuzzing connection that throws random JSON, protocol
messages with wrong field types, deep nesting, huge numbers, non-JSON text, binary frames,
invalid UTF-8, WebSocket protocol violations and oversized frames at the server. Each case
is checked against docs/protocol.md:

- a well-formed text frame within the size cap gets exactly one reply: an ``error`` with a
  documented code (and the documented ``requestId`` echo) or the right reply
  (``registered``, ``discover-response``, ``pong``); a successful relay gets none, and its
  receiver gets the message with ``from`` set;
- a binary frame gets ``binary-frame`` and the connection stays usable;
- invalid UTF-8 closes with 1007, a protocol violation with 1002, an oversized message
  with 1009 (then a new fuzzing connection is opened); a client close is echoed;
- the honest clients get every one of their messages, intact and in order;
- afterwards the worker is the one that booted, /health answers 200 and the log has no
  traceback and no error line.

The expected outcome of a text frame comes from ``Oracle``, which applies the rules of
docs/protocol.md in their documented order. JSON syntax is judged by orjson, the parser
the server uses: its limits (nesting deeper than 1024, numbers beyond double range) are
what the protocol calls "too deep" and "too large to parse". The protocol names no
depth, so ``invalid-json`` is also accepted for anything nested 255 levels or more.

A relay whose JSON nests 255 or more levels parses (orjson reads up to 1024 levels) but
cannot be written back (orjson.dumps stops at 254): the server refuses it with
``invalid-message`` before it looks the target up (this fuzz test found it answering
``internal-error`` once).

Cases are reproducible: hypothesis runs derandomized (see ``reproducible_hypothesis``),
so a failure in CI replays with ``pytest tests/fuzz``; hypothesis prints the
failing case, which can be pinned with ``@example``. How many cases ran, by category and
outcome, is printed in the terminal summary (the "volli fuzz" section).

The package: ``spec`` (what docs/protocol.md fixes that the test relies on, and the
cast of user IDs), ``strategies`` (the cases), ``oracle`` (the expected outcome of a text
frame), ``rig`` (the server's clients: two honest ones, a probe and the fuzzer) and
``test_fuzz_server`` (the tests).
"""
