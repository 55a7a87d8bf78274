"""Locust load test for the MaMe inference server: variants weighted, requests named by variant.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 -u 20 -r 5 -t 60s --stop-timeout 30 \
        --variants baseline:1,mame-0.9:2 [--model vit-b16] [--images DIR] [--top-k 5] --json-file stats

--stop-timeout lets the last requests finish, so that the counts equal the server's; the final statistics
are then in stats.json (docs/loadtest.md).

Each request draws a variant by weight and shows up in Locust's statistics as `classify [<variant>]`.
An answer that is not 200, or that names another variant than the one asked for, counts as a failure.
A bad --variants, --images or --top-k stops Locust at start with one line and exit status 2.
"""
from __future__ import annotations

import itertools
import logging
import random
import sys
from pathlib import Path

from locust import HttpUser, between, events, task
from locust.runners import MasterRunner

from loadtest.images import ImagePayload, load_images
from loadtest.variants import parse_weighted_variants

logger = logging.getLogger(__name__)
# Parsed options by their raw values: parsed once, shared by every user (the web UI may change them).
_parsed: dict[tuple[str, str, int], tuple[dict[str, float], list[ImagePayload]]] = {}


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--variants", default="", help="NAME[:WEIGHT],... (default: the server's default)")
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--images", default="", help="image directory (default: bundled samples)")
    parser.add_argument("--top-k", type=int, default=0, help="top_k query parameter (0: server default)")


def parsed_options(options) -> tuple[dict[str, float], list[ImagePayload]]:
    """Variant weights and images from the options; ValueError names a bad value."""
    key = (options.variants, options.images, options.top_k)
    if key not in _parsed:
        if options.top_k < 0:
            raise ValueError(f"--top-k must be 0 (server default) or positive, got {options.top_k}")
        weights = parse_weighted_variants(options.variants)
        _parsed[key] = (weights, load_images(Path(options.images) if options.images else None))
    return _parsed[key]


@events.init.add_listener
def _check_options(environment, runner=None, **_kwargs) -> None:
    # Checked once before any user starts: otherwise every user fails in on_start with a traceback,
    # and a headless run without -t then waits forever with nothing to send. A distributed master
    # runs no users (its --images may not exist where it runs); each worker checks for itself.
    if environment.parsed_options is None or isinstance(runner, MasterRunner):
        return
    try:
        parsed_options(environment.parsed_options)
    except ValueError as error:
        logger.error("%s", error)
        sys.exit(2)


class ClassifyUser(HttpUser):
    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.weights, images = parsed_options(options)
        self.model = options.model
        self.top_k = options.top_k
        self.images = itertools.cycle(random.sample(images, len(images)))

    @task
    def classify(self) -> None:
        variant = (
            random.choices(list(self.weights), weights=list(self.weights.values()))[0] if self.weights else ""
        )
        params = {key: value for key, value in
                  (("model", self.model), ("variant", variant), ("top_k", self.top_k or "")) if value}
        image = next(self.images)
        with self.client.post("/v1/classify", params=params, data=image.data,
                              headers={"Content-Type": image.content_type},
                              name=f"classify [{variant or 'default'}]", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif variant and response.json().get("variant") != variant:
                response.failure(f"asked for variant {variant}, answered {response.json().get('variant')}")
            else:
                response.success()
