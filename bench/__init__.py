"""Benchmarks that print tables and write JSON under bench/out: quality (against the primitives' true shapes) and speed."""
