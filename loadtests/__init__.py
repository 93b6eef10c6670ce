"""Load tests (locust) and benchmarks for the gateway against the fake upstream."""
