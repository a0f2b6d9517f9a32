from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from serve_app.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_validates_against_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    validate_config(prepare_config(config))  # Ray's own check, after it fills its defaults
    gpu = [t for t in config["available_node_types"].values() if t["max_workers"] > 0]
    assert gpu, "a GPU worker type that the autoscaler may add"
    assert any("pip install" in c and "dit-serve" in c for c in config["setup_commands"])


def test_validate_config_command(tmp_path, capsys):
    assert main(["validate-config", str(ROOT / "configs" / "local.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "x", "args": {"limits": {"max_n": 100}}}]}))
    assert main(["validate-config", str(bad)]) == 1
    assert "max_n" in capsys.readouterr().err


LOCAL = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())


def validate(tmp_path, capsys, content) -> tuple[int, str, str]:
    """`dit-serve validate-config` on a file holding `content` (text, or a document to dump)."""
    path = tmp_path / "config.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    status = main(["validate-config", str(path)])
    out, err = capsys.readouterr()
    return status, out, err


def local_with(change) -> dict:
    """configs/local.yaml with `change(document, application)` applied."""
    document = copy.deepcopy(LOCAL)
    change(document, document["applications"][0])
    return document


def assert_one_problem(status, out, err, *words):
    """Exit 1 and exactly one line on stderr, naming the file and holding every word."""
    assert status == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].split(": ", 1)[0].endswith("config.yaml"), "the line starts with the file"
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in out + err


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_validate_config_passes_every_shipped_config(name, capsys):
    assert main(["validate-config", str(ROOT / "configs" / name)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("dit-serve: ok") and err == ""
    if "flux-" in name:  # a hub id: said so, not fetched
        assert "black-forest-labs/FLUX.1-dev: hub id, not checked offline" in out


def test_validate_config_refuses_a_cluster_launcher_file(capsys):
    assert main(["validate-config", str(ROOT / "cluster.yaml")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "cluster.yaml: a Ray cluster launcher file (cluster_name: dit-serve)" in err


def test_validate_config_missing_file_is_a_usage_error(tmp_path, capsys):
    assert main(["validate-config", str(tmp_path / "nope.yaml")]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"error: {tmp_path / 'nope.yaml'}: no such file" and out == ""
    assert main(["validate-config", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, words",
    [
        ("", ["empty", "applications"]),
        ("# only a comment\n", ["empty"]),
        ("applications: [a\n", ["not valid YAML", "line 2"]),
        ("- one\n- two\n", ["top level is a list, not a mapping"]),
        ("just words\n", ["top level is a string"]),
        ("applications: []\n", ["applications: must be a non-empty list"]),
        ("import_path: serve_app.app:build_app\n", ["put it under `applications:`"]),
        ("http_options: {port: 8000}\n", ["no `applications:` list", "http_options"]),
    ],
)
def test_validate_config_unusable_documents(tmp_path, capsys, content, words):
    assert_one_problem(*validate(tmp_path, capsys, content), *words)


@pytest.mark.parametrize(
    "import_path, words",
    [
        ("serve_app.app:build_graph", ["'serve_app.app:build_graph' is not dit-serve's app"]),
        ("serve_app.nope:build_app", ["does not import", "No module named 'serve_app.nope'"]),
        ("serve_app.app:nope", ["does not import", "nope"]),
        ("build_app", ["not an import path"]),
        (None, ["import_path: missing"]),
    ],
)
def test_validate_config_import_path(tmp_path, capsys, import_path, words):
    def change(document, app):
        app["import_path"] = import_path
        if import_path is None:
            del app["import_path"]

    status, out, err = validate(tmp_path, capsys, local_with(change))
    words = ["dit-serve: import_path:", "use serve_app.app:build_app", *words]
    assert_one_problem(status, out, err, *words)


def test_validate_config_import_path_may_resolve_to_build_app(tmp_path, capsys):
    document = local_with(lambda d, app: app.update(import_path="serve_app.app.build_app"))
    assert validate(tmp_path, capsys, document) == (0, "dit-serve: ok\n", "")


def test_validate_config_deployment_names_come_from_the_app(tmp_path, capsys):
    document = local_with(lambda d, app: app["deployments"][2].update(name="Denoisr"))
    status, out, err = validate(tmp_path, capsys, document)
    assert_one_problem(
        status, out, err, "dit-serve: deployments: unknown deployment 'Denoisr'",
        "did you mean 'Denoiser'?", "this app has ImagesAPI, TextEncoder, Denoiser, VAEDecoder",
    )
    twice = local_with(lambda d, app: app["deployments"].append({"name": "VAEDecoder"}))
    assert_one_problem(*validate(tmp_path, capsys, twice), "deployments.VAEDecoder: listed twice")


@pytest.mark.parametrize(
    "deployment, key, value, words",
    [
        (1, "autoscalng_config", {}, ["deployments.TextEncoder.autoscalng_config: unknown key",
                                      "did you mean 'autoscaling_config'?"]),
        (1, "autoscaling_config", {"min_replica": 2},
         ["deployments.TextEncoder.autoscaling_config.min_replica: unknown key"]),
        (3, "ray_actor_options", {"num_cpu": 1},
         ["deployments.VAEDecoder.ray_actor_options.num_cpu: unknown key"]),
        (0, "max_ongoing_requests", "many",
         ["deployments.ImagesAPI.max_ongoing_requests: Input should be a valid integer"]),
        (2, "placement_group_bundles", [{"CPU": 1}],
         ["deployments.Denoiser.placement_group_bundles is derived from the app's args"]),
        (1, "max_ongoing_requests", 2,
         ["deployments.TextEncoder.max_ongoing_requests (2) is below"]),
    ],
)
def test_validate_config_deployment_options(tmp_path, capsys, deployment, key, value, words):
    document = local_with(lambda d, app: app["deployments"][deployment].update({key: value}))
    assert_one_problem(*validate(tmp_path, capsys, document), "dit-serve:", *words)


def test_validate_config_serve_top_level_and_app_keys(tmp_path, capsys):
    typo = local_with(lambda d, app: d.update(http_option={"port": 8000}))
    status, out, err = validate(tmp_path, capsys, typo)
    assert_one_problem(status, out, err, "http_option: unknown key", "did you mean 'http_options'?")
    assert out == "dit-serve: ok\n"  # the application itself is fine
    port = local_with(lambda d, app: d["http_options"].update(port="eighty"))
    assert_one_problem(*validate(tmp_path, capsys, port), "http_options.port: Input should be")
    app_key = local_with(lambda d, app: app.update(arg={}))
    assert_one_problem(*validate(tmp_path, capsys, app_key), "dit-serve: arg: unknown key")


def test_validate_config_model_path(tmp_path, capsys):
    def with_path(path):
        return local_with(lambda d, app: app["args"]["model"].update(path=path))

    def check(path, *words):
        assert_one_problem(*validate(tmp_path, capsys, with_path(path)), *words)

    missing = tmp_path / "no-such-model"
    check(str(missing), f"dit-serve: args.model.path: {missing} is not a folder")
    folder = tmp_path / "model"
    folder.mkdir()
    check(str(folder), "holds no model_index.json")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert validate(tmp_path, capsys, with_path(str(folder))) == (0, "dit-serve: ok\n", "")
    check("./models/flux", "is a relative path")
    check("a//b c", "neither an absolute folder nor a hub id")
    check("builtin:tiny-fluxx", "unknown builtin model 'builtin:tiny-fluxx'")
    status, out, err = validate(tmp_path, capsys, with_path("someone/some-model"))
    assert (status, err) == (0, "") and "someone/some-model: hub id, not checked offline" in out


def test_make_tiny_model_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("keep me")
    assert main(["make-tiny-model", "--family", "flux", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "x").read_text() == "keep me"


def test_make_tiny_model_default_goes_where_builtin_resolves(private_cache, capsys):
    from deployments.tiny.store import resolve_model_path

    assert main(["make-tiny-model", "--family", "flux"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == resolve_model_path("builtin:tiny-flux")
    assert printed.startswith(os.environ["DIT_SERVE_CACHE"])
