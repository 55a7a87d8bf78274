"""Inference: building the served models, the per-model queues and batching, the device workers (threads,
or a process per device), Prometheus metrics, and the service that ties them together."""
