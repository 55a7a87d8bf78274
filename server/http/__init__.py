"""The engine's HTTP face: the FastAPI app, its routes, middleware, answers and OpenAPI description, and the
handling of requests that front-end processes decoded."""
