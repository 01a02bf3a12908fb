"""POST /v1/images/generations with the official `openai` package, unchanged, pointed at the real stack."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image


@pytest.fixture
def oai(live_stack):
    url, key, _ = live_stack
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_b64_json_gives_n_decodable_images_of_the_size(oai, live_stack):
    answer = oai.images.generate(model="sdxl", prompt="a lighthouse", n=2, size="64x64", response_format="b64_json")
    assert len(answer.data) == 2
    pictures = [base64.b64decode(d.b64_json) for d in answer.data]
    for blob in pictures:
        with Image.open(io.BytesIO(blob)) as im:
            assert im.format == "PNG" and im.size == (64, 64)
    assert pictures[0] != pictures[1]  # two seeds, two images
    # the same tenant's job, like any other
    url, key, _ = live_stack
    jobs = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).json()["jobs"]
    assert answer.model_extra["job_id"] in [j["id"] for j in jobs]


def test_url_answers_signed_urls_and_quality_sets_the_steps(oai, live_stack):
    answer = oai.images.generate(prompt="a red bicycle", size="96x64", quality="low", response_format="url", n=1)
    r = httpx.get(answer.data[0].url)
    assert r.status_code == 200
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (96, 64)
    url, key, _ = live_stack
    job = httpx.get(f"{url}/v1/jobs/{answer.model_extra['job_id']}", headers={"Authorization": f"Bearer {key}"})
    assert job.json()["request"]["steps"] == 10  # quality "low"


def test_extensions_go_through_extra_body(oai):
    a = oai.images.generate(prompt="x", size="64x64", response_format="b64_json", extra_body={"seed": 9, "steps": 2})
    b = oai.images.generate(prompt="x", size="64x64", response_format="b64_json", extra_body={"seed": 9, "steps": 2})
    pixels = [Image.open(io.BytesIO(base64.b64decode(d.data[0].b64_json))).tobytes() for d in (a, b)]
    assert pixels[0] == pixels[1]  # same seed, same pixels (the PNG's text chunk names each job apart)


@pytest.mark.parametrize(
    ("kwargs", "param", "says"),
    [
        ({"size": "65x65"}, "size", "65x65 is not served"),
        ({"size": "64x64", "n": 9}, "n", "at most"),
        ({"size": "64x64", "model": "dall-e-3"}, "model", "'dall-e-3' is not served"),
    ],
)
def test_refusals_are_openai_errors_naming_the_parameter(oai, kwargs, param, says):
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        oai.images.generate(prompt="a cat", **kwargs)
    assert refused.value.body["param"] == param and says in refused.value.message


def test_every_job_field_is_mapped_or_said_not_to_be():
    from api.routes.openai import NOT_MAPPED, ImageGeneration
    from common.jobs import JobRequest

    mapped = {"num_images", "width", "height"}  # from n and size
    assert set(JobRequest.model_fields) - mapped - set(ImageGeneration.model_fields) == set(NOT_MAPPED)


@pytest.mark.parametrize("field", ["init_image", "loras", "controlnets", "ip_adapter", "refiner"])
def test_a_job_field_it_does_not_map_is_refused_by_name(field):
    from pydantic import ValidationError

    from api.routes.openai import ImageGeneration

    with pytest.raises(ValidationError) as refused:
        ImageGeneration.model_validate({"prompt": "x", field: []})
    assert [e["loc"] for e in refused.value.errors()] == [(field,)]


def test_a_bad_key_is_openais_authentication_error(live_stack):
    url, _, _ = live_stack
    stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="sdxl_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="unknown or revoked API key"):
        stranger.images.generate(prompt="a cat", size="64x64")
