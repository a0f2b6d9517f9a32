"""Client mistakes become ApiErrors that name the parameter (no Ray: parse + plan only)."""

from __future__ import annotations

import json

import pytest

from serve_app.config import AppConfig
from deployments.errors import ApiError, InvalidJson, InvalidParameter, ModelNotFound, PayloadTooLarge
from serve_app.protocol import parse_generation_request
from serve_app.planning import Planner


@pytest.fixture()
def service(tmp_path):
    return Planner(AppConfig())


def plan(service, **body):
    body.setdefault("prompt", "a cat")
    return service.plan(parse_generation_request(json.dumps(body).encode()), "rid-1")


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "n": 1.5}, "n"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "size": 512}, "size"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": "7"}, "seed"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": -1.0}, "guidance_scale"),
        ({"prompt": "x", "response_format": "png"}, "response_format"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "output_compression": 101}, "output_compression"),
        ({"prompt": "x", "lora_scale": 0.5}, "lora_scale"),
        ({"prompt": "x", "negative_prompt": 3}, "negative_prompt"),
    ],
)
def test_schema_errors_name_the_parameter(body, param):
    with pytest.raises(InvalidParameter) as info:
        parse_generation_request(json.dumps(body).encode())
    assert info.value.param == param
    assert info.value.status == 400
    assert param in info.value.message


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b"", b"null"])
def test_malformed_bodies(raw):
    with pytest.raises(InvalidJson) as info:
        parse_generation_request(raw)
    assert info.value.status == 400


def test_oversized_body():
    with pytest.raises(PayloadTooLarge) as info:
        parse_generation_request(b"{" + b" " * 1_000_001 + b"}")
    assert info.value.status == 413


@pytest.mark.parametrize(
    "raw, deep",
    [
        (b"[" * 5000 + b"]" * 5000, True),
        (b"{" * 100_000, True),  # unbalanced: refused before the parser recurses
        (b'{"a":' * 33 + b"1" + b"}" * 33, True),
        (b'{"a":' * 32 + b"1" + b"}" * 32, False),
        (b'{"prompt": "' + b"[" * 5000 + b'"}', False),  # brackets inside a string do not count
        (b'{"prompt": "a \\\" [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', False),  # nor after an escaped quote
        ('{"prompt": "é' + "[" * 40 + '"}', False),
    ],
)
def test_nesting_deeper_than_32_levels_is_a_400_naming_the_body(raw, deep):
    from serve_app.protocol import json_too_deep

    raw = raw.encode() if isinstance(raw, str) else raw
    assert json_too_deep(raw) is deep
    if deep:
        with pytest.raises(InvalidJson) as info:
            parse_generation_request(raw)
        assert info.value.status == 400 and "request body" in info.value.message
        assert "32 levels" in info.value.message


def test_a_deep_body_the_byte_scan_misreads_is_still_a_400():
    """UTF-16 JSON (json.loads accepts it) can fool the byte scan: U+2200 is the byte pair 00 22,
    which the scan reads as a quote, so it takes the brackets for the inside of a string. The
    parser's own recursion limit is then the backstop: still a 400, never a RecursionError."""
    from serve_app.protocol import json_too_deep

    raw = ('["\u2200", ' + "[" * 100_000 + "]" * 100_000 + ', "\u2200"]').encode("utf-16-le")
    assert not json_too_deep(raw)
    with pytest.raises(InvalidJson) as info:
        parse_generation_request(raw)
    assert info.value.status == 400 and "32 levels" in info.value.message


@pytest.mark.parametrize("content_type", [None, "", "application/json", "Application/JSON; charset=utf-8", "application/vnd.api+json"])
def test_json_content_types_are_read(content_type):
    assert parse_generation_request(b'{"prompt": "a cat"}', content_type).prompt == "a cat"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b"])
def test_other_content_types_are_a_415_naming_the_header(content_type):
    from serve_app.errors import UnsupportedMediaType

    with pytest.raises(UnsupportedMediaType) as info:
        parse_generation_request(b'{"prompt": "a cat"}', content_type)
    assert info.value.status == 415 and info.value.param == "Content-Type"


OPTIONAL_FIELDS = [
    "model", "n", "size", "response_format", "output_format", "output_compression", "quality", "style",
    "user", "background", "moderation", "seed", "num_inference_steps", "guidance_scale", "stream",
    "partial_images",
]


def test_null_means_the_default_for_every_optional_field(service):
    from serve_app.jobs import request_hash
    from serve_app.protocol import ImageGenerationRequest

    optional = {n for n, f in ImageGenerationRequest.model_fields.items() if not f.is_required()}
    assert set(OPTIONAL_FIELDS) <= optional
    body = {name: None for name in optional}
    req = parse_generation_request(json.dumps({"prompt": "a cat", **body}).encode())
    default = parse_generation_request(b'{"prompt": "a cat"}')
    assert req == default and request_hash(req) == request_hash(default)
    assert (req.n, req.response_format) == (1, "b64_json")
    encode, spec = service.plan(req, "rid")
    assert spec.sampling.num_inference_steps == 4 and len(spec.sampling.seeds) == 1


def test_null_is_still_refused_where_a_value_is_required():
    with pytest.raises(InvalidParameter) as info:
        parse_generation_request(b'{"prompt": null}')
    assert info.value.param == "prompt"
    with pytest.raises(InvalidParameter) as info:
        parse_generation_request(b'{"prompt": "x", "mask": null}')
    assert info.value.param == "mask"


def test_size_auto_is_the_configured_default(service):
    _, spec = plan(service, size="auto")
    assert (spec.sampling.width, spec.sampling.height) == (256, 256)
    config = AppConfig.model_validate({"defaults": {"size": "128x64"}})
    _, spec = Planner(config).plan(parse_generation_request(b'{"prompt": "x", "size": "auto"}'), "r")
    assert (spec.sampling.width, spec.sampling.height) == (128, 64)


def test_gpt_image_fields_are_accepted_where_their_meaning_holds():
    for body in ({"background": "auto"}, {"background": "opaque"}, {"moderation": "auto"}, {"moderation": "low"}):
        assert parse_generation_request(json.dumps({"prompt": "x", **body}).encode())
    with pytest.raises(InvalidParameter) as info:
        parse_generation_request(b'{"prompt": "x", "background": "transparent"}')
    assert info.value.param == "background" and "opaque" in info.value.message
    for field, value in (("background", "clear"), ("moderation", "strict")):
        with pytest.raises(InvalidParameter) as info:
            parse_generation_request(json.dumps({"prompt": "x", field: value}).encode())
        assert info.value.param == field


@pytest.mark.parametrize(
    "body, param, error",
    [
        ({"size": "1024"}, "size", InvalidParameter),
        ({"size": "100x100"}, "size", InvalidParameter),  # not a multiple of 16
        ({"size": "32x32"}, "size", InvalidParameter),  # below limits.min_size
        ({"size": "1024x1024"}, "size", InvalidParameter),  # above limits.max_size
        ({"size": "256x-256"}, "size", InvalidParameter),
        ({"n": 5}, "n", InvalidParameter),
        ({"num_inference_steps": 51}, "num_inference_steps", InvalidParameter),
        ({"guidance_scale": 20.5}, "guidance_scale", InvalidParameter),
        ({"prompt": "   "}, "prompt", InvalidParameter),
        ({"prompt": "x" * 4001}, "prompt", InvalidParameter),
        ({"model": "dall-e-3"}, "model", ModelNotFound),
        ({"output_compression": 50}, "output_compression", InvalidParameter),  # png
    ],
)
def test_limits_of_the_deployed_model(service, body, param, error):
    with pytest.raises(error) as info:
        plan(service, **body)
    assert info.value.param == param
    assert 400 <= info.value.status < 500


def test_plan_fills_defaults_and_seeds(service):
    encode, spec = plan(service, n=3, seed=41, size="128x64")
    assert encode.prompt == "a cat" and encode.request_id == "rid-1"
    assert (spec.sampling.width, spec.sampling.height) == (128, 64)
    assert spec.sampling.seeds == (41, 42, 43)
    assert spec.sampling.num_inference_steps == 4 and spec.sampling.guidance_scale == 3.5
    assert spec.output_format == "png"
    _, spec = plan(service, seed=2**64 - 1, n=2)
    assert spec.sampling.seeds == (2**64 - 1, 0)
    _, a = plan(service)
    _, b = plan(service)
    assert a.sampling.seeds != b.sampling.seeds  # random when absent


def test_error_bodies_are_openai_shaped():
    err = InvalidParameter("size must look like 1024x1024", "size")
    assert err.body() == {
        "error": {
            "message": "size must look like 1024x1024",
            "type": "invalid_request_error",
            "param": "size",
            "code": "invalid_parameter",
        }
    }
    assert isinstance(err, ApiError)


def test_api_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(InvalidParameter("bad", "n")))
    assert (err.message, err.param, err.status) == ("bad", "n", 400)


def test_server_failures_carry_only_the_request_id(caplog):
    import json as _json

    from deployments.errors import StageFailure, Unavailable
    from serve_app.errors import error_response

    with caplog.at_level("ERROR", logger="dit_serve"):
        response = error_response(RuntimeError("secret detail /srv/model.py line 12"), "req-42")
    body = _json.loads(response.body)
    assert response.status_code == 500
    assert body["error"]["request_id"] == "req-42" and "req-42" in body["error"]["message"]
    assert "secret" not in response.body.decode()
    assert any("req-42" in r.getMessage() and r.exc_info for r in caplog.records)

    response = error_response(StageFailure("denoiser", "req-43"), "req-43")
    assert response.status_code == 500 and "denoiser" not in response.body.decode()

    response = error_response(Unavailable("the denoiser is restarting; retry the request"), "req-44")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"


def test_errors_raised_in_another_process_are_unwrapped():
    """Ray delivers a stage's exception wrapped (RayTaskError with .cause, nested per hop)."""
    from ray.exceptions import RayTaskError

    from serve_app.errors import classify

    original = InvalidParameter("prompt is 600 tokens long", "prompt")
    inner = RayTaskError("encode", "traceback", original)
    outer = RayTaskError("decode", "traceback", inner)
    assert classify(outer) is original


def test_a_stage_dying_under_a_chained_request_is_a_retryable_503():
    """Serve's router raises RayServeException `from` the ActorDiedError of an upstream replica
    (here: the denoiser replica retiring while the VAE waited on its result)."""
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import RayServeException

    from deployments.errors import Unavailable
    from serve_app.errors import classify, error_response

    wrapped = RayServeException("Request to deployment 'VAEDecoder' failed: upstream actor died")
    wrapped.__cause__ = ActorDiedError()
    outer = RayTaskError("decode", "traceback", wrapped)
    assert isinstance(classify(outer), Unavailable)
    response = error_response(outer, "req-45")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"


@pytest.mark.parametrize(
    "degree, size, ok",
    [
        (1, "256x240", True),
        (2, "256x240", False),  # 15 rows of latent patches cannot be split in 2 equal bands
        (2, "240x256", True),  # only the height is split
        (2, "272x224", True),
        (4, "256x224", False),
        (4, "256x192", True),
    ],
)
def test_heights_an_sp_group_cannot_split_are_rejected_naming_size(tmp_path, degree, size, ok):
    """xfuser splits the latent rows into SP-degree bands and fails on a remainder (its padding
    path calls a method that does not exist): such sizes are a 400 before they join a batch."""
    config = AppConfig.model_validate({"denoiser": {"ulysses_degree": degree}})
    service = Planner(config)
    if ok:
        _, spec = plan(service, size=size)
        assert f"{spec.sampling.width}x{spec.sampling.height}" == size
    else:
        with pytest.raises(InvalidParameter) as info:
            plan(service, size=size)
        assert info.value.param == "size"
        assert f"multiple of {16 * degree}" in info.value.message
