"""Benchmarks that print tables and write JSON under bench/out: quality (against the primitives' true shapes) and speed."""

__all__: list[str] = []  # the package exports nothing itself: import its modules by name
