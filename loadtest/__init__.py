"""Load testing for the MaMe inference server: an open/closed-loop generator, per-variant reports,
latency-throughput sweeps, and a Locust file."""
