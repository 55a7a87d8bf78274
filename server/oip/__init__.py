"""The Open Inference Protocol (KServe v2, Triton's HTTP API) as pure functions, without torch.

- tensors.py: datatypes, and an answer's tensor data as JSON or binary data
- request.py: reading an infer request body and its tensors; plan.py: checking it against a model (ModelSpec)
- response.py: the infer response (classification extension, binary outputs); metadata.py: the rest
- interface.py: what the engine must provide (Engine); handlers.py: the endpoints and ROUTES
docs/oip.md says how clients use it.
"""
