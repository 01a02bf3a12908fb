import pytest

from common.settings import Settings, parse_sizes


def test_settings_require_a_real_signing_secret():
    with pytest.raises(ValueError, match="SDXL_URL_SIGNING_SECRET"):
        Settings(url_signing_secret=None).signing_key()
    with pytest.raises(ValueError, match="SDXL_URL_SIGNING_SECRET"):
        Settings(url_signing_secret="short").signing_key()


def test_settings_refuse_a_visibility_timeout_shorter_than_a_job_is_held():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="SDXL_VISIBILITY_TIMEOUT_S"):
        Settings(batch_timeout_s=10, visibility_timeout_s=20)


def test_sizes_are_height_x_width():
    assert parse_sizes("1024x1024, 832x1216") == [(1024, 1024), (832, 1216)]
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_sizes("1024")


def test_model_variant_is_a_plain_name():
    import pydantic

    assert Settings(model_variant="fp16").model_variant == "fp16"
    with pytest.raises(pydantic.ValidationError, match="model_variant"):
        Settings(model_variant="../fp16")
