"""The data set line format: defaults, derived seeds, and a clear reason for every bad line."""

from __future__ import annotations

import json

import pytest

from common.datasets import DatasetOptions, Limits, Line, LineError, Validator, derive_seed

LIMITS = Limits(sizes=[(1024, 1024), (64, 96)], max_steps=50, max_prompt_chars=100)


def validator(**options) -> Validator:
    return Validator(DatasetOptions(**options), run_seed=7, limits=LIMITS)


def test_defaults_fill_what_a_line_leaves_out():
    v = validator(defaults={"steps": 8, "negative_prompt": "blurry", "width": 96, "height": 64})
    line = v.check(3, json.dumps({"id": "a-1", "prompt": "a fox", "steps": 4}))
    assert isinstance(line, Line) and line.line == 3 and line.id == "a-1"
    r = line.request
    assert (r.prompt, r.steps, r.negative_prompt, r.width, r.height, r.num_images) == ("a fox", 4, "blurry", 96, 64, 1)
    assert Line.from_json(line.to_json()) == line  # what the chunks store reads back the same


def test_seeds_come_from_the_run_seed_and_the_id_not_the_position():
    a, b = validator(), validator()
    first = a.check(1, '{"id": "x", "prompt": "p"}')
    moved = b.check(900, '{"id": "x", "prompt": "another prompt"}')
    assert first.request.seed == moved.request.seed == derive_seed(7, "x")
    assert a.check(2, '{"id": "y", "prompt": "p"}').request.seed != first.request.seed
    other_run = Validator(DatasetOptions(), run_seed=8, limits=LIMITS)
    assert other_run.check(1, '{"id": "x", "prompt": "p"}').request.seed != first.request.seed
    assert a.check(3, '{"id": "z", "prompt": "p", "seed": 12}').request.seed == 12  # a given seed is kept
    assert 0 <= derive_seed(2**32 - 1, "any") <= 2**32 - 1


def test_integer_ids_are_accepted_as_strings():
    assert validator().check(1, '{"id": 17, "prompt": "p"}').id == "17"


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
        ('{"id": "a", "prompt": "p", "num_images": 2}', "num_images", "unknown field"),
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
    assert isinstance(v.check(1, '{"id": "a", "prompt": "p"}'), Line)
    error = v.check(4, '{"id": "a", "prompt": "q"}')
    assert error == LineError(4, "id", "duplicate id 'a', first used on line 1")


def test_blank_lines_are_ignored_and_bytes_must_be_utf8():
    v = validator()
    assert v.check(1, b"") is None and v.check(2, "   ") is None
    assert v.check(3, b'{"id": "a", "prompt": "\xff"}') == LineError(3, "line", "not UTF-8 text")
