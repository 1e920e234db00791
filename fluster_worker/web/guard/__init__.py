"""Who may call the worker: the Host allowlist, address rules, the container
networks' refusal of state changes, and the optional bearer token, applied to
every request before any handler (``gate.AccessGate``)."""
