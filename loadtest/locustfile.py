"""Locust load test for the MaMe inference server: variants weighted, requests named by variant.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 -u 20 -r 5 -t 60s \
        --variants baseline:1,mame-0.9:2 [--model vit-b16] [--images DIR] [--top-k 5]

Each request draws a variant by weight and shows up in Locust's statistics as `classify [<variant>]`.
An answer that is not 200, or that names another variant than the one asked for, counts as a failure.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path

from locust import HttpUser, between, events, task

from loadtest.images import ImagePayload, load_images
from loadtest.variants import parse_weighted_variants


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--variants", default="", help="NAME[:WEIGHT],... (default: the server's default)")
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--images", default="", help="image directory (default: bundled samples)")
    parser.add_argument("--top-k", type=int, default=0, help="top_k query parameter (0: server default)")


class ClassifyUser(HttpUser):
    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.weights = parse_weighted_variants(options.variants)
        self.model = options.model
        self.top_k = options.top_k
        images: list[ImagePayload] = load_images(Path(options.images) if options.images else None)
        self.images = itertools.cycle(random.sample(images, len(images)))

    @task
    def classify(self) -> None:
        variant = random.choices(list(self.weights), weights=list(self.weights.values()))[0] if self.weights else ""
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
