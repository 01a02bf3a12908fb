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


def test_sizes_are_written_width_x_height():
    # (height, width) pairs inside: 1216x832 is landscape, 1216 wide
    assert parse_sizes("1024x1024, 1216x832") == [(1024, 1024), (832, 1216)]
    assert Settings(image_sizes="1216x832,1024x1024").served_sizes[0] == (832, 1216)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_sizes("1024")


def test_the_old_sizes_setting_is_refused_with_its_new_spelling(monkeypatch):
    import pydantic

    monkeypatch.setenv("SDXL_SIZES", "832x1216,1024x1024")  # HEIGHTxWIDTH: 832 high, 1216 wide
    with pytest.raises(pydantic.ValidationError, match="SDXL_IMAGE_SIZES=1216x832,1024x1024"):
        Settings()


def test_absent_width_and_height_take_the_first_served_size():
    from common.jobs import JobRequest, LimitError, with_size

    sizes = Settings(image_sizes="1216x832,1024x1024,832x1216").served_sizes
    fill = lambda **kw: with_size(JobRequest(prompt="p", **kw), sizes)  # noqa: E731
    assert (fill().width, fill().height) == (1216, 832)
    assert (fill(width=1024).width, fill(width=1024).height) == (1024, 1024)
    assert (fill(height=1216).width, fill(height=1216).height) == (832, 1216)
    with pytest.raises(LimitError, match="no served size has width 640"):
        fill(width=640)


def test_model_variant_is_a_plain_name():
    import pydantic

    assert Settings(model_variant="fp16").model_variant == "fp16"
    with pytest.raises(pydantic.ValidationError, match="model_variant"):
        Settings(model_variant="../fp16")


def test_models_are_named_entries_with_their_own_overrides():
    s = Settings(
        models="base=stabilityai/stable-diffusion-xl-base-1.0;vae=madebyollin/sdxl-vae-fp16-fix, "
        "turbo = stabilityai/sdxl-turbo, local=/models/x.safetensors;unet=/m/u.safetensors"
    )
    assert [(e.name, e.spec, e.vae, e.unet) for e in s.model_entries] == [
        ("base", "stabilityai/stable-diffusion-xl-base-1.0", "madebyollin/sdxl-vae-fp16-fix", ""),
        ("turbo", "stabilityai/sdxl-turbo", "", ""),
        ("local", "/models/x.safetensors", "", "/m/u.safetensors"),
    ]
    # without SDXL_MODELS: the one SDXL_MODEL, named as written, with SDXL_VAE / SDXL_UNET
    alone = Settings(model="tiny", vae="/v")
    assert [(e.name, e.spec, e.vae) for e in alone.model_entries] == [("tiny", "tiny", "/v")]


@pytest.mark.parametrize(
    ("models", "extra", "message"),
    [
        ("base", {}, "is not NAME=SPEC"),
        ("a=x,a=y", {}, "given twice"),
        ("a b=x", {}, "letters, digits"),
        ("a=x;refiner=y", {}, "not vae=... or unet=..."),
        ("a=x", {"vae": "/v"}, "give each model its own"),
    ],
)
def test_bad_model_entries_say_what_is_wrong(models, extra, message):
    with pytest.raises(ValueError, match=message):
        Settings(models=models, **extra)


def test_controlnets_are_named_entries_in_order():
    s = Settings(controlnets="canny=/models/cn-canny, depth=/models/depth.safetensors")
    assert s.controlnet_specs == {"canny": "/models/cn-canny", "depth": "/models/depth.safetensors"}
    assert Settings().controlnet_specs == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [("canny", "not NAME=SPEC"), ("=/x", "not NAME=SPEC"), ("a b=/x", "not NAME=SPEC"), ("a=/x,a=/y", "named twice")],
)
def test_bad_controlnet_entries_say_what_is_wrong(value, message):
    with pytest.raises(ValueError, match=message):
        Settings(controlnets=value)


def test_ip_adapters_are_named_entries_with_the_encoder_after_a_colon():
    s = Settings(ip_adapters="style=/m/ip-adapter_sdxl.safetensors, vith=/m/ip_vit-h.safetensors:/m/image_encoder")
    assert s.ip_adapter_specs == {
        "style": "/m/ip-adapter_sdxl.safetensors",
        "vith": "/m/ip_vit-h.safetensors:/m/image_encoder",
    }
    with pytest.raises(ValueError, match="SDXL_IP_ADAPTERS: 'style' is named twice"):
        Settings(ip_adapters="style=/a,style=/b")
