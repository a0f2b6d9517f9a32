"""The HTTP edge of the real app, built in-process (`build_api` on an ingress replica's context,
no Ray): body limits, nesting, content types, traversal, HEAD, request ids, CORS, allowed hosts,
the OpenAPI document and the offline /docs page. No test here reaches a stage (the replica's
stage handles are None): what needs them is in tests/integration/test_compat.py."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from starlette.testclient import TestClient

from serve_app.config import AppConfig
from serve_app.protocol import MAX_BODY_BYTES

POSTS = ("/v1/images/generations", "/v1/images/jobs")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Builds the FastAPI app of one ingress replica for some args, with a job store and image
    folder of its own. Its lifespan is not run: no dispatcher picks up the jobs queued here."""
    from serve_app import ingress

    replica_class = ingress.ImagesAPI.func_or_class.__bases__[0]  # the class under @serve.ingress

    def make(args: dict | None = None):
        tmp = tmp_path_factory.mktemp("app")
        args = {**(args or {}), "jobs": {"store": {"path": str(tmp / "jobs.sqlite3")}}}
        args["image_store"] = {"directory": str(tmp / "images")}
        config = AppConfig.model_validate(args)
        replica = replica_class({name: (None, None, None) for name in config.views()}, config)
        return ingress.build_api(replica.ctx)

    return make


@pytest.fixture(scope="module")
def app(build):
    return build()


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def assert_error(r, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in r.text
    return error


def asgi(app, method: str, path: str, headers: dict, chunks: list[bytes]):
    """Drive the app with raw ASGI messages: (status, headers, body, chunks the app read)."""
    read = 0
    sent: list[dict] = []

    async def receive():
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}
        await asyncio.sleep(3600)  # the client is still there; nothing more to read

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, read


# -- bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", POSTS)
def test_deep_nesting_is_a_400_naming_the_body(client, path):
    for body in (b"[" * 5000 + b"]" * 5000, b'{"prompt": ' + b"[" * 5000, b'{"a":' * 40 + b"1" + b"}" * 40):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        error = assert_error(r, 400, None, "invalid_json")
        assert "request body" in error["message"] and "32 levels" in error["message"]


@pytest.mark.parametrize("path", POSTS)
def test_content_length_over_the_limit_is_a_413_without_reading(app, path):
    status, headers, body, read = asgi(
        app, "POST", path, {"content-type": "application/json", "content-length": str(MAX_BODY_BYTES + 1)}, [b"{}"]
    )
    assert status == 413 and read == 0
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert headers["x-request-id"]


@pytest.mark.parametrize("path", POSTS)
def test_a_chunked_body_is_cut_at_the_limit(app, client, path):
    chunk = b" " * 100_000
    chunks = [chunk] * 50  # 5 MB, no Content-Length
    status, _, body, read = asgi(app, "POST", path, {"content-type": "application/json"}, chunks)
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    assert read <= MAX_BODY_BYTES // len(chunk) + 1  # stopped reading at the cap
    # The same through a real HTTP client sending Transfer-Encoding: chunked.
    r = client.post(path, content=(chunk for _ in range(20)), headers={"content-type": "application/json"})
    assert_error(r, 413, None, "payload_too_large")


def test_a_body_longer_than_its_content_length_is_cut_at_the_limit(app):
    chunks = [b" " * 100_000] * 30
    status, _, body, read = asgi(
        app, "POST", POSTS[0], {"content-type": "application/json", "content-length": "10"}, chunks
    )
    assert status == 413 and read <= 11


def test_a_malformed_content_length_is_a_400_naming_it(app):
    status, _, body, read = asgi(app, "POST", POSTS[0], {"content-length": "ten"}, [b"{}"])
    assert status == 400 and read == 0
    assert json.loads(body)["error"]["param"] == "Content-Length"


@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml"],
)
def test_a_body_that_is_not_json_is_a_415_naming_content_type(client, path, content_type):
    r = client.post(path, content=b'{"prompt": "a cat"}', headers={"content-type": content_type})
    error = assert_error(r, 415, "Content-Type", "unsupported_media_type")
    assert content_type.split(";")[0] in error["message"]


@pytest.mark.parametrize("path", POSTS)
def test_json_content_types_and_none_are_read_as_json(client, path):
    for headers in ({"content-type": "application/json; charset=utf-8"}, {"content-type": "application/merge+json"}, {}):
        r = client.post(path, content=b'{"size": "64x64"}', headers=headers)
        assert_error(r, 400, "prompt")  # parsed, then refused for what it lacks


def test_form_bodies_as_curl_sends_them_without_a_content_type(client):
    r = client.post(POSTS[0], data={"prompt": "a cat"})  # application/x-www-form-urlencoded
    assert_error(r, 415, "Content-Type")


# -- paths and routes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/images/..%2F..%2Fetc%2Fpasswd",
        "/images/..%2f..%2fetc%2fpasswd",
        "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/images/..%5C..%5Cetc%5Cpasswd",
        "/images/%00",
        "/images/" + "a" * 32 + "%00.png",
        "/images/" + "a" * 32 + ".png%00.txt",
        "/images/" + "a" * 32 + ".png",
        "/images/..",
        "/images/%2e%2e",
    ],
)
def test_image_names_never_reach_the_file_system(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    assert r.json()["error"]["param"] in (None, "name")  # no route matched, or no such image
    assert "root:" not in r.text


def test_unknown_routes_and_methods_are_openai_shaped(client):
    assert_error(client.get("/v1/nothing"), 404, None, "not_found")
    r = client.put("/v1/images/generations", json={})
    assert_error(r, 405, None, "method_not_allowed")
    assert r.headers["allow"] == "POST"


def test_parameter_checks_are_400s_naming_the_parameter_never_422(client):
    assert_error(client.get("/v1/images/jobs?limit=0"), 400, "limit")
    assert_error(client.get("/v1/images/jobs?limit=abc"), 400, "limit")
    assert_error(client.get("/v1/images/jobs?order=up"), 400, "order")
    assert_error(client.get("/v1/images/jobs?after=nope"), 400, "after")
    assert_error(client.get("/v1/images/jobs/job_000000000000000000000000/events?after=-1"), 400, "after")
    assert_error(client.get("/v1/images/jobs/job_000000000000000000000000/events?after=" + "9" * 30), 400, "after")


def test_a_retrieved_model_is_the_served_one_or_a_404_naming_model(client):
    r = client.get("/v1/models/tiny-flux")
    assert r.status_code == 200 and r.json()["id"] == "tiny-flux" and r.json()["object"] == "model"
    error = assert_error(client.get("/v1/models/black-forest-labs/FLUX.1-dev"), 404, "model", "model_not_found")
    assert "black-forest-labs/FLUX.1-dev" in error["message"] and "tiny-flux" in error["message"]


def test_a_model_id_with_a_slash_is_one_id(build):
    client = TestClient(build({"model": {"name": "black-forest-labs/FLUX.1-dev"}}))
    r = client.get("/v1/models/black-forest-labs/FLUX.1-dev")
    assert r.status_code == 200 and r.json()["id"] == "black-forest-labs/FLUX.1-dev"
    assert_error(client.get("/v1/models/black-forest-labs"), 404, "model")
    assert_error(client.get("/v1/models/black-forest-labs%2FFLUX.1-dev%2Fx"), 404, "model")


# -- HEAD, request ids --------------------------------------------------------------------------


def test_head_answers_every_get_route_with_the_headers_and_no_body(app, client):
    job = client.post("/v1/images/jobs", json={"prompt": "a cat", "size": "64x64"}).json()["id"]
    routes = {  # every GET route: a path to it (two for some)
        "/v1/models": ["/v1/models"],
        "/v1/models/{model:path}": ["/v1/models/tiny-flux", "/v1/models/nope"],
        "/v1/images/jobs": ["/v1/images/jobs"],
        "/v1/images/jobs/{job_id}": [f"/v1/images/jobs/{job}", "/v1/images/jobs/job_000000000000000000000000"],
        "/images/{name}": ["/images/" + "a" * 32 + ".png"],
        "/openapi.json": ["/openapi.json"],
        "/docs": ["/docs"],
        "/docs/static/{asset}": ["/docs/static/swagger-ui.css", "/docs/static/nope"],
        "/health": ["/health"],
        "/ready": ["/ready"],
    }
    get_routes = {r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())}
    # Tested apart: the event stream (below) and /v1/status (it asks a running Ray cluster).
    assert get_routes - set(routes) <= {"/v1/images/jobs/{job_id}/events", "/v1/status"}
    for path in (p for paths in routes.values() for p in paths):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code, path
        assert head.content == b"", path
        for name in ("content-type", "content-length"):
            assert head.headers.get(name) == get.headers.get(name), (path, name)


def test_head_on_an_event_stream_ends_with_its_headers(client):
    job = client.post("/v1/images/jobs", json={"prompt": "a dog", "size": "64x64"}).json()["id"]
    r = client.head(f"/v1/images/jobs/{job}/events")  # the job stays queued: the stream never ends
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-type"].startswith("text/event-stream")


def test_every_response_carries_one_request_id(client):
    for method, path in [("get", "/v1/models"), ("get", "/nothing"), ("post", POSTS[0]), ("head", "/docs")]:
        r = getattr(client, method)(path)
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), (path, r.headers)
        # An id on the request means Serve's proxy set it and echoes it itself: none added here.
        r = getattr(client, method)(path, headers={"x-request-id": "my-id-7"})
        assert r.headers.get_list("x-request-id") == []
    body = client.post(POSTS[0], content=b"{", headers={"content-type": "application/json"}).json()
    assert "request_id" not in body["error"]  # only 5xx bodies carry it


def test_an_exception_no_route_answered_is_a_shaped_500_with_the_request_id(caplog):
    from serve_app.asgi import RequestEdge

    async def broken(scope, receive, send):
        raise RuntimeError("secret detail /srv/model.py line 12")

    with caplog.at_level("ERROR", logger="dit_serve"):
        status, headers, body, _ = asgi(RequestEdge(broken), "GET", "/x", {}, [])
    error = json.loads(body)["error"]
    assert status == 500 and error["code"] == "internal_error"
    assert error["request_id"] == headers["x-request-id"] and headers["x-request-id"] in error["message"]
    assert b"secret" not in body
    assert any(headers["x-request-id"] in r.getMessage() and r.exc_info for r in caplog.records)


def test_plain_text_errors_of_other_layers_are_reshaped():
    from starlette.responses import PlainTextResponse

    from serve_app.asgi import ShapeErrors

    for status, text, param in [(400, "Invalid host header", "Host"), (503, "Request dropped: queue full", None)]:
        inner = PlainTextResponse(text, status_code=status, headers={"Retry-After": "3"})
        code, headers, body, _ = asgi(ShapeErrors(inner), "GET", "/x", {"x-request-id": "r-1"}, [])
        error = json.loads(body)["error"]
        assert code == status and headers["content-type"] == "application/json"
        assert headers["retry-after"] == "3" and int(headers["content-length"]) == len(body)
        assert error["param"] == param
        if status >= 500:
            assert error["request_id"] == "r-1" and "queue full" not in error["message"]


# -- CORS and hosts -----------------------------------------------------------------------------


def preflight(client, origin: str, method: str = "POST"):
    return client.options(
        POSTS[0],
        headers={
            "origin": origin,
            "access-control-request-method": method,
            "access-control-request-headers": "content-type, authorization",
        },
    )


def cors_headers(r) -> dict:
    return {k: v for k, v in r.headers.items() if k.startswith("access-control-")}


def test_cors_is_off_by_default(client):
    r = preflight(client, "https://app.example.com")
    assert cors_headers(r) == {}
    assert cors_headers(client.get("/v1/models", headers={"origin": "https://app.example.com"})) == {}


def test_cors_answers_allowed_origins_only(build):
    client = TestClient(build({"cors": {"allow_origins": ["https://app.example.com"]}}))
    r = preflight(client, "https://app.example.com")
    assert r.status_code == 200
    headers = cors_headers(r)
    assert headers["access-control-allow-origin"] == "https://app.example.com"
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"]
    r = client.get("/v1/models", headers={"origin": "https://app.example.com"})
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = client.post(POSTS[0], content=b"{", headers={"origin": "https://app.example.com", "content-type": "application/json"})
    assert r.status_code == 400 and r.headers["access-control-allow-origin"] == "https://app.example.com"
    for origin in ("https://evil.example.com", "null"):
        assert cors_headers(preflight(client, origin)) == {}
        assert cors_headers(client.get("/v1/models", headers={"origin": origin})) == {}


def test_allowed_hosts_refuse_other_host_headers(build):
    client = TestClient(build({"http": {"allowed_hosts": ["api.example.com", "*.internal.example.com"]}}))
    assert client.get("/v1/models", headers={"host": "api.example.com"}).status_code == 200
    assert client.get("/v1/models", headers={"host": "node-3.internal.example.com:8000"}).status_code == 200
    r = client.get("/v1/models", headers={"host": "evil.example.com"})
    assert_error(r, 400, "Host")
    job = client.post("/v1/images/jobs", json={"prompt": "x", "size": "64x64"}, headers={"host": "evil.example.com"})
    assert_error(job, 400, "Host")  # so no URL is ever built from that Host


# -- OpenAPI and /docs --------------------------------------------------------------------------


def test_openapi_documents_the_real_bodies_parameters_and_errors(client):
    doc = client.get("/openapi.json").json()
    schemas, paths = doc["components"]["schemas"], doc["paths"]
    request = schemas["ImageGenerationRequest"]
    assert request["required"] == ["prompt"] and request["additionalProperties"] is False
    props = request["properties"]
    limits = AppConfig().limits

    def branch(prop):
        return next(b for b in prop.get("anyOf", [prop]) if b.get("type") != "null")

    assert branch(props["n"])["maximum"] == limits.max_n
    assert branch(props["num_inference_steps"])["maximum"] == limits.max_steps
    assert branch(props["prompt"])["maxLength"] == limits.max_prompt_chars
    assert re.match(branch(props["size"])["pattern"], "auto") and re.match(branch(props["size"])["pattern"], "64x128")
    for name in set(props) - {"prompt"}:  # every optional field takes null
        assert {"type": "null"} in props[name]["anyOf"], name
    for path in POSTS:
        body = paths[path]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"]["$ref"].endswith("/ImageGenerationRequest")
    assert "202" in paths["/v1/images/jobs"]["post"]["responses"]
    retry_after = paths["/v1/images/generations"]["post"]["responses"]["429"]["headers"]["Retry-After"]
    assert retry_after["required"] is True
    params = {(p["name"], op): p["schema"] for op in ("get", "delete") for p in paths["/v1/images/jobs/{job_id}"][op]["parameters"]}
    assert params[("job_id", "get")]["pattern"] == "^job_[0-9a-f]{24}$"
    listing = {p["name"]: p["schema"] for p in paths["/v1/images/jobs"]["get"]["parameters"]}
    assert (listing["limit"]["minimum"], listing["limit"]["maximum"]) == (1, 100)
    assert listing["order"]["enum"] == ["asc", "desc"]
    assert "pattern" in json.dumps(listing["after"])
    image = paths["/images/{name}"]["get"]
    assert image["parameters"][0]["schema"]["pattern"].startswith("^[A-Za-z0-9_-]{32}")
    assert set(image["responses"]["200"]["content"]) == {"image/png", "image/jpeg", "image/webp"}
    for path, item in paths.items():
        for method, op in item.items():
            responses = op["responses"]
            assert "422" not in responses, (path, method)
            for status, response in responses.items():
                assert response["headers"]["X-Request-ID"]["required"], (path, status)
                if status.startswith(("4", "5")) and path not in ("/ready",):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse"), (path, method, status)
    assert "HTTPValidationError" not in schemas


def test_docs_render_from_local_assets_only(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert urls and all(u.startswith("/") for u in urls), urls
    for url in urls:
        r = client.get(url)
        assert r.status_code == 200 and r.content, url
    js = client.get("/docs/static/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith("text/javascript") and b"SwaggerUIBundle" in js.content
    assert_error(client.get("/docs/static/..%2F..%2Fpyproject.toml"), 404)
    assert_error(client.get("/docs/static/index.html"), 404, "asset")
