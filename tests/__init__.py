"""The test suite (a package, so that tests.models can be imported by tools and benchmarks)."""
