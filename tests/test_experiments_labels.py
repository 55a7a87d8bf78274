"""Labels posted after the answer: the bounded map of recent answers, and POST /v1/labels in process (the
FastAPI app over httpx's ASGI transport, a tiny ViT)."""

from __future__ import annotations

import asyncio

import pytest
from serverproc import metric_values, sample_images, tiny_config
from test_http_app import app_of, running

from server.config import parse_config
from server.experiments.labels import RecentAnswers
from server.experiments.registry import Assignment
from server.wire.errors import ApiError

ROUTE = Assignment("tiny", "mame-0.9", "tau-ab", "assigned")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def classes(model: str) -> int:
    return 10


def test_answers_are_scored_once_against_their_top1_and_top5():
    answers = RecentAnswers(10, 60.0)
    answers.remember("r1", ROUTE, [[3, 1, 2, 7, 9], [4, 5, 6, 7, 8], [0, 1, 2, 3, 4]])
    scored = answers.score("r1", [3, 7, 9], classes)
    assert (scored.images, scored.top1_correct, scored.top5_correct, scored.route) == (3, 1, 2, ROUTE)
    with pytest.raises(ApiError) as again:
        answers.score("r1", [3, 7, 9], classes)
    assert (again.value.status, again.value.code) == (409, "already_labelled")


@pytest.mark.parametrize(
    ("labels", "status", "code", "detail"),
    [
        ([1], 422, "invalid_parameter", "answered 2 image(s); got 1 label(s)"),
        ([1, 10], 422, "invalid_parameter", "outside model 'tiny'"),
        ([1, -1], 422, "invalid_parameter", "classes 0..9"),
    ],
)
def test_bad_labels_are_refused_and_leave_the_answer_labellable(labels, status, code, detail):
    answers = RecentAnswers(10, 60.0)
    answers.remember("r", ROUTE, [[1, 2], [3, 4]])
    with pytest.raises(ApiError) as refused:
        answers.score("r", labels, classes)
    assert (refused.value.status, refused.value.code) == (status, code) and detail in refused.value.detail
    assert answers.score("r", [1, 4], classes).top5_correct == 2


def test_the_map_is_bounded_by_entries_and_by_age():
    clock = Clock()
    answers = RecentAnswers(3, 10.0, clock)
    for i in range(5):
        answers.remember(f"r{i}", ROUTE, [[i]])
    assert len(answers) == 3
    with pytest.raises(ApiError, match="no recent answer") as evicted:
        answers.score("r1", [1], classes)
    assert evicted.value.status == 404 and evicted.value.code == "unknown_request"
    clock.now = 5.0
    answers.remember("r2", ROUTE, [[2]])  # an id sent again: the newest answer counts, kept the longest
    clock.now = 12.0
    answers.remember("r5", ROUTE, [[5]])  # r3, r4 (answered at 0) expire
    assert len(answers) == 2 and answers.score("r2", [2], classes).top1_correct == 1
    with pytest.raises(ApiError, match="no recent answer"):
        answers.score("r4", [4], classes)
    clock.now = 30.0
    with pytest.raises(ApiError, match="no recent answer"):  # expired when asked, even with no new answers
        answers.score("r5", [5], classes)
    with pytest.raises(ValueError, match="capacity"):
        RecentAnswers(0, 1.0)


def test_labels_over_http_count_in_metrics_and_the_report():
    config = tiny_config(experiments={"tau-ab": {
        "model": "tiny", "split": {"baseline": 0.5, "mame-0.9": 0.5}, "sticky": "header:X-User-Id"}})
    app = app_of(parse_config(config), preprocess_threads=1)
    images = sample_images()

    async def check(client):
        answered = await client.post("/v1/classify", params={"experiment": "tau-ab", "top_k": 1},
                                     content=images["shapes"], headers={"x-request-id": "lab-1"})
        body = answered.json()
        assert answered.status_code == 200 and len(body["predictions"]) == 1  # top 5 kept, top 1 shown
        top1, variant = body["predictions"][0]["index"], body["variant"]
        posted = await client.post("/v1/labels", json={"request_id": "lab-1", "labels": [top1]})
        assert posted.status_code == 200, posted.text
        assert posted.json() == {"request_id": "lab-1", "model": "tiny", "variant": variant,
                                 "experiment": "tau-ab", "images": 1, "top1_correct": 1, "top5_correct": 1}
        again = await client.post("/v1/labels", json={"request_id": "lab-1", "labels": [top1]})
        assert again.status_code == 409 and again.json()["error"] == "already_labelled"
        unknown = await client.post("/v1/labels", json={"request_id": "nope", "labels": [0]})
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_request"
        several = await client.post("/v1/classify", params={"experiment": "tau-ab"}, headers={
            "x-request-id": "lab-2"}, files=[("file", ("a.png", images["flat"], "image/png")),
                                             ("file", ("b.png", images["noise"], "image/png"))])
        assert several.status_code == 200
        short = await client.post("/v1/labels", json={"request_id": "lab-2", "labels": [0]})
        assert short.status_code == 422 and "got 1 label(s)" in short.json()["detail"]
        malformed = await client.post("/v1/labels", json={"request_id": "lab-2", "labels": "cat"})
        assert malformed.status_code == 422
        metrics = (await client.get("/metrics")).text
        key = f'{{experiment="tau-ab",model="tiny",variant="{variant}"}}'
        assert metric_values(metrics, "mame_labelled_images_total")[key] == 1
        assert metric_values(metrics, "mame_label_top1_correct_total")[key] == 1
        assert metric_values(metrics, "mame_label_top5_correct_total")[key] == 1
        report = (await client.get("/v1/experiments/tau-ab")).json()
        assert report["variants"][variant]["labels"] == {"images": 1, "top1_correct": 1, "top5_correct": 1,
                                                         "top1_accuracy": 1.0, "top5_accuracy": 1.0}

    asyncio.run(running(app, check))


def test_labels_off_keeps_no_answers():
    app = app_of(parse_config(tiny_config(labels={"max_answers": 0})), preprocess_threads=1)
    assert app.state.engine.answers is None
