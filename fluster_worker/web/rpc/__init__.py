"""Connect RPC over Klein, and the wire contract's protobuf messages."""
