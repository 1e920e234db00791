"""Client-side tools: what a user runs against a worker (``python -m
fluster_worker.try_job``). They speak only the wire contract, with the official
Connect client; the worker never imports them (import-linter)."""
