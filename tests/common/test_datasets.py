"""The data set line format: defaults, derived seeds, several images, aspect-ratio buckets, the user's own
fields, and a clear reason for every bad line."""

from __future__ import annotations

import json

import pytest

from common.datasets import (
    GENERATION_FIELDS,
    KEYS_ONLY,
    OTHER_JOB_FIELDS,
    DatasetDefaults,
    DatasetOptions,
    Limits,
    Line,
    LineError,
    Validator,
    derive_seed,
    lines_of,
    nearest_bucket,
    parse_aspect_ratio,
)
from common.jobs import JobRequest
from common.settings import SDXL_BUCKETS, parse_sizes

LIMITS = Limits(sizes=[(1024, 1024), (64, 96)], max_steps=50, max_prompt_chars=100)


def validator(**options) -> Validator:
    return Validator(DatasetOptions(**options), run_seed=7, limits=LIMITS)


def one(v: Validator, number: int, text: str | bytes) -> Line:
    """The line's single image (a line without num_images is one)."""
    found = v.check(number, text)
    assert isinstance(found, list) and len(found) == 1, found
    return found[0]


def test_defaults_fill_what_a_line_leaves_out():
    v = validator(defaults={"steps": 8, "negative_prompt": "blurry", "width": 96, "height": 64})
    line = one(v, 3, json.dumps({"id": "a-1", "prompt": "a fox", "steps": 4}))
    assert isinstance(line, Line) and line.line == 3 and line.id == "a-1"
    r = line.request
    assert (r.prompt, r.steps, r.negative_prompt, r.width, r.height, r.num_images) == ("a fox", 4, "blurry", 96, 64, 1)
    assert Line.from_json(line.to_json()) == line  # what the chunks store reads back the same


def test_seeds_come_from_the_run_seed_and_the_id_not_the_position():
    a, b = validator(), validator()
    first = one(a, 1, '{"id": "x", "prompt": "p"}')
    moved = one(b, 900, '{"id": "x", "prompt": "another prompt"}')
    assert first.request.seed == moved.request.seed == derive_seed(7, "x")
    assert one(a, 2, '{"id": "y", "prompt": "p"}').request.seed != first.request.seed
    other_run = Validator(DatasetOptions(), run_seed=8, limits=LIMITS)
    assert one(other_run, 1, '{"id": "x", "prompt": "p"}').request.seed != first.request.seed
    assert one(a, 3, '{"id": "z", "prompt": "p", "seed": 12}').request.seed == 12  # a given seed is kept
    assert 0 <= derive_seed(2**32 - 1, "any") <= 2**32 - 1


def test_integer_ids_are_accepted_as_strings():
    assert one(validator(), 1, '{"id": 17, "prompt": "p"}').id == "17"


@pytest.mark.parametrize(
    "text,field,hint",
    [
        ("{not json", "line", "not valid JSON"),
        ("[1, 2]", "line", "JSON object"),
        ('{"prompt": "p"}', "id", "required"),
        ('{"id": true, "prompt": "p"}', "id", "required"),
        ('{"id": "a b", "prompt": "p"}', "id", "letters, digits"),
        ('{"id": "a.png", "prompt": "p"}', "id", "letters, digits"),
        ('{"id": "a", "prompt": ""}', "prompt", "at least 1 character"),
        ('{"id": "a"}', "prompt", "Field required"),
        ('{"id": "a", "prompt": "p", "steps": 0}', "steps", "greater than or equal to 1"),
        ('{"id": "a", "prompt": "p", "steps": 51}', "steps", "at most 50"),
        ('{"id": "a", "prompt": "p", "width": 512, "height": 512}', "width", "is not served"),
        ('{"id": "a", "prompt": "p", "scheduler": "plms"}', "scheduler", "euler"),
        ('{"id": "a", "prompt": "p", "guidance_scale": "high"}', "guidance_scale", "valid number"),
        ('{"id": "a", "prompt": "p", "seed": -1}', "seed", "greater than or equal to 0"),
        ('{"id": "a", "prompt": "p", "num_images": 0}', "num_images", "from 1 to 64"),
        ('{"id": "a", "prompt": "p", "num_images": 1.5}', "num_images", "from 1 to 64"),
        ('{"id": "a", "prompt": "p", "label": "cat"}', "label", "put your own fields in `metadata`"),
        ('{"id": "a", "prompt": "p", "metadata": [1]}', "metadata", "an object"),
        ('{"id": "a", "prompt": "p", "metadata": {"x": "' + "y" * 5000 + '"}}', "metadata", "at most 4096"),
        ('{"id": "a", "prompt": "p", "caption": 3}', "caption", "a string"),
        ('{"id": "a", "prompt": "p", "aspect_ratio": "wide"}', "aspect_ratio", "W:H"),
        ('{"id": "a", "prompt": "p", "aspect_ratio": 1.5, "width": 96}', "aspect_ratio", "not both"),
        ('{"id": "a", "promt": "p"}', "promt", "unknown field; a line may have: id, prompt"),
        ('{"id": "a", "prompt": "' + "x" * 101 + '"}', "prompt", "at most 100 characters"),
    ],
)
def test_bad_lines_say_which_field_and_why(text, field, hint):
    error = validator().check(5, text)
    assert isinstance(error, LineError), error
    assert error.line == 5 and error.field == field and hint in error.message, error


def test_duplicate_ids_name_the_first_line():
    v = validator()
    assert isinstance(one(v, 1, '{"id": "a", "prompt": "p"}'), Line)
    error = v.check(4, '{"id": "a", "prompt": "q"}')
    assert error == LineError(4, "id", "duplicate id 'a', first used on line 1")


def test_blank_lines_are_ignored_and_bytes_must_be_utf8():
    v = validator()
    assert v.check(1, b"") is None and v.check(2, "   ") is None
    assert v.check(3, b'{"id": "a", "prompt": "\xff"}') == LineError(3, "line", "not UTF-8 text")


def test_sdxl_buckets_by_aspect_ratio():
    buckets = parse_sizes(SDXL_BUCKETS)  # (height, width)
    assert [nearest_bucket(r, buckets) for r in (1.0, 1.3, 0.56)] == [(1024, 1024), (896, 1152), (1344, 768)]
    assert nearest_bucket(parse_aspect_ratio("16:9"), buckets) == (768, 1344)
    assert nearest_bucket(parse_aspect_ratio("2:3"), buckets) == (1216, 832)


def test_aspect_ratio_picks_the_nearest_served_bucket_and_is_recorded():
    limits = Limits(
        sizes=[(64, 64), (64, 96), (96, 64)],
        max_steps=50,
        max_prompt_chars=100,
        buckets=[(64, 64), (64, 96), (96, 64), (1024, 1024)],
    )
    v = Validator(DatasetOptions(), run_seed=7, limits=limits)
    wide = one(v, 1, '{"id": "w", "prompt": "p", "aspect_ratio": "16:9"}')
    assert (wide.request.width, wide.request.height, wide.aspect_ratio) == (96, 64, 16 / 9)
    tall = one(v, 2, '{"id": "t", "prompt": "p", "aspect_ratio": 0.6}')
    assert (tall.request.width, tall.request.height) == (64, 96)
    none_served = Validator(DatasetOptions(), 7, Limits([(64, 64)], 50, 100, buckets=[(1024, 1024)]))
    error = none_served.check(1, '{"id": "a", "prompt": "p", "aspect_ratio": 1}')
    assert isinstance(error, LineError) and "no aspect-ratio bucket is served" in error.message


def test_num_images_makes_one_line_per_image_with_derived_ids_and_seeds():
    v = validator()
    images = v.check(1, '{"id": "cat", "prompt": "p", "num_images": 3}')
    assert [i.id for i in images] == ["cat_0", "cat_1", "cat_2"] and {i.source_id for i in images} == {"cat"}
    assert [i.request.seed for i in images] == [derive_seed(7, f"cat_{k}") for k in range(3)]
    seeded = v.check(2, '{"id": "dog", "prompt": "p", "num_images": 2, "seed": 40}')
    assert [i.request.seed for i in seeded] == [40, 41]
    assert isinstance(v.check(3, '{"id": "cat_1", "prompt": "p"}'), LineError)  # taken by line 1's images
    assert isinstance(v.check(4, '{"id": "cat", "prompt": "p"}'), LineError)


def test_caption_and_metadata_travel_with_the_line():
    v = validator()
    line = one(v, 1, '{"id": "a", "prompt": "a cat", "caption": "tabby cat", "metadata": {"label": 3, "split": "val"}}')
    assert line.caption == "tabby cat" and line.metadata == {"label": 3, "split": "val"}
    assert Line.from_json(line.to_json()) == line
    assert one(v, 2, '{"id": "b", "prompt": "a dog"}').caption == "a dog"  # no caption: the prompt
    by_metadata = validator(caption_field="metadata.text")
    line = one(by_metadata, 1, '{"id": "a", "prompt": "p", "metadata": {"text": "from metadata"}}')
    assert line.caption == "from metadata"


def test_a_byte_order_mark_is_accepted():
    lines = list(lines_of([b'\xef\xbb\xbf{"id": "a", "prompt": "p"}\n', b'{"id": "b", "prompt": "q"}\n']))
    v = validator()
    assert [one(v, n, raw).id for n, raw in lines] == ["a", "b"]
    assert one(validator(), 1, '\ufeff{"id": "a", "prompt": "p"}').id == "a"


def test_every_field_of_a_job_is_a_line_field_or_left_out_for_a_reason():
    # a field added to JobRequest fails this until it is a line field (and a default) or named in OTHER_JOB_FIELDS
    assert set(JobRequest.model_fields) == set(GENERATION_FIELDS) | set(OTHER_JOB_FIELDS)
    assert not set(GENERATION_FIELDS) & set(OTHER_JOB_FIELDS)
    assert set(DatasetDefaults.model_fields) == set(GENERATION_FIELDS) - {"prompt", "seed"} | {"output_format"}


KEY = "inputs/_/" + "a" * 64 + ".png"


def test_a_lines_image_fields_from_the_line_or_the_defaults_are_kept_by_key():
    v = validator(defaults={"ip_adapter": {"name": "style", "image": KEY}, "timestep_spacing": "trailing"})
    line = one(
        v, 1, json.dumps({"id": "a", "prompt": "p", "init_image": KEY, "strength": 0.5, "width": 96, "height": 64})
    )
    r = line.request
    assert (r.init_image, r.strength, r.timestep_spacing, r.ip_adapter.image) == (KEY, 0.5, "trailing", KEY)


@pytest.mark.parametrize(
    ("images", "field"),
    [
        ({"init_image": "iVBORw0KGgo="}, "init_image"),
        ({"init_image": KEY, "mask_image": "data:image/png;base64,iVBORw0KGgo="}, "mask_image"),
        ({"controlnets": [{"name": "c", "image": "iVBORw0KGgo="}]}, "controlnets[0].image"),
        ({"ip_adapter": {"name": "s", "image": "iVBORw0KGgo="}}, "ip_adapter.image"),
    ],
)
def test_a_line_names_images_by_key_never_by_their_bytes(images, field):
    # a JSONL of base64 images would be the file's size many times over, every line held in Redis while in flight
    error = validator().check(1, json.dumps({"id": "a", "prompt": "p", **images}))
    assert error == LineError(1, field, KEYS_ONLY)
