"""gputrace benchmarks (run as root: `make bench`).  Not part of the test suite."""
