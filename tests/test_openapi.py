"""The OpenAPI document, generated from the route declarations, and the /docs page."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate

from notification_service.api import Answer, Link
from notification_service.config import Config
from notification_service.notification_handler import api
from notification_service.openapi import document

ROOT = Path(__file__).resolve().parent.parent
KEY = "k" * 32


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {
        (method.upper(), path): operation
        for path, methods in doc["paths"].items()
        for method, operation in methods.items()
    }


def test_the_document_is_valid_openapi_3_1(client: FlaskClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.get_json()
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_every_route_of_the_app_is_in_the_document(app: Flask) -> None:
    doc = document(api.endpoints, Config())
    documented = set(_operations(doc))
    served = {
        (method, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule))
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    assert served == documented


def test_the_committed_copy_is_the_generated_document() -> None:
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert committed == document(api.endpoints, Config()), (
        "docs/openapi.json is stale: python -m notification_service openapi > docs/openapi.json"
    )


def test_list_max_limit_from_the_config_is_the_documented_maximum(
    make_app: Callable[..., Flask], make_config: Callable[..., Config]
) -> None:
    doc = make_app(make_config(list_max_limit=37)).test_client().get("/openapi.json").get_json()
    limit = next(p for p in doc["paths"]["/list"]["get"]["parameters"] if p.get("name") == "limit")
    assert limit["schema"]["maximum"] == 37


def test_headers_and_errors_are_documented() -> None:
    ops = _operations(document(api.endpoints, Config()))
    create = ops[("POST", "/create")]
    refs = [p.get("$ref", "") for p in create["parameters"]]
    assert "#/components/parameters/IdempotencyKey" in refs
    assert "Idempotent-Replay" in create["responses"]["201"]["headers"]
    assert set(create["responses"]) >= {"200", "201", "400", "401", "404", "409", "413", "422",
                                        "503"}  # fmt: skip
    assert set(create["responses"]["409"]["content"]["application/json"]["examples"]) == {
        "user_document_invalid",
        "idempotency_key_in_use",
    }
    assert "Retry-After" in create["responses"]["503"]["headers"]
    count = ops[("GET", "/count")]
    assert "ETag" in count["responses"]["200"]["headers"]
    assert "304" in count["responses"]
    for operation in ops.values():
        for answer in operation["responses"].values():
            assert "X-Request-ID" in answer["headers"]


def test_probes_docs_and_inbox_page_need_no_key_and_the_rest_does() -> None:
    ops = _operations(document(api.endpoints, Config()))
    open_ = {key for key, operation in ops.items() if operation.get("security") == []}
    assert open_ == {
        ("GET", "/health"),
        ("GET", "/ready"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/{asset}"),
        ("GET", "/inbox"),
        ("GET", "/inbox/{asset}"),
        ("GET", "/unsubscribe/{token}"),
        ("POST", "/unsubscribe/{token}"),
    }
    assert all("401" in ops[key]["responses"] for key in set(ops) - open_)


def test_the_inbox_routes_are_documented_as_taking_a_user_token_and_no_other() -> None:
    doc = document(api.endpoints, Config())
    ops = _operations(doc)
    by_token = {key for key, op in ops.items() if {"userToken": []} in op.get("security", [])}
    assert by_token == {
        ("GET", "/list"),
        ("GET", "/count"),
        ("GET", "/stream"),
        ("POST", "/read"),
        ("POST", "/read-all"),
        ("POST", "/delete"),
        ("POST", "/delete-all"),
        ("GET", "/preferences"),
        ("PUT", "/preferences"),
    }
    in_query = {key for key, op in ops.items() if {"userTokenQuery": []} in op.get("security", [])}
    assert in_query == {("GET", "/stream")}
    assert doc["components"]["securitySchemes"]["userTokenQuery"]["name"] == "token"
    for key in by_token:
        examples = ops[key]["responses"]["403"]["content"]["application/json"]["examples"]
        assert set(examples) == {"token_for_another_user"}, key
        assert (
            "token_expired"
            in ops[key]["responses"]["401"]["content"]["application/json"]["examples"]
        )
    for key in set(ops) - by_token - {k for k, op in ops.items() if op.get("security") == []}:
        assert "security" not in ops[key], key  # the document's default: the API key alone
        examples = ops[key]["responses"]["403"]["content"]["application/json"]["examples"]
        assert set(examples) == {"token_not_accepted"}, key


def test_docs_and_document_are_served_without_the_key_when_keys_are_set(
    make_app: Callable[..., Flask], make_config: Callable[..., Config]
) -> None:
    client = make_app(make_config(api_keys=(KEY,))).test_client()
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/docs/swagger-ui-bundle.js").status_code == 200
    assert client.get("/list?user_id=0123456789abcdef01234567").status_code == 401


def test_docs_page_loads_only_files_the_package_serves(client: FlaskClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "http://" not in html and "https://" not in html  # nothing from a CDN
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(assets) == ["docs/docs.js", "docs/swagger-ui-bundle.js", "docs/swagger-ui.css"]
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    for asset, mimetype in [
        ("docs/docs.js", "text/javascript"),
        ("docs/swagger-ui-bundle.js", "text/javascript"),
        ("docs/swagger-ui.css", "text/css"),
    ]:
        response = client.get(f"/{asset}")
        assert response.status_code == 200, asset
        assert response.mimetype == mimetype
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    script = client.get("/docs/docs.js").get_data(as_text=True)
    assert "openapi.json" in script and "http" not in script


def test_docs_serve_nothing_else_of_the_package(client: FlaskClient) -> None:
    for path in [
        "/docs/config.py",
        "/docs/..%2fconfig.py",
        "/docs/swagger-ui%2fLICENSE",
        "/docs/docs.html",
        "/docs/" + "a" * 65,
    ]:
        response = client.get(path)
        assert response.status_code in (404, 422), path
        assert response.get_json()["success"] is False


def test_the_documented_docs_assets_are_those_the_page_loads(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    asset = doc["paths"]["/docs/{asset}"]["get"]["parameters"][0]
    assert asset["name"] == "asset"
    loaded = re.findall(r'(?:src|href)="docs/([^"]+)"', client.get("/docs").get_data(as_text=True))
    assert sorted(asset["schema"]["enum"]) == sorted(loaded)
    for name in asset["schema"]["enum"]:
        assert client.get(f"/docs/{name}").status_code == 200, name


def test_every_link_names_an_operation_and_its_parameters() -> None:
    doc = document(api.endpoints, Config())
    by_id = {operation["operationId"]: operation for operation in _operations(doc).values()}
    links = [
        link
        for operation in by_id.values()
        for answer in operation["responses"].values()
        for link in answer.get("links", {}).values()
    ]
    assert len(links) >= 5
    for link in links:
        names = {p.get("name") for p in by_id[link["operationId"]]["parameters"]}
        assert set(link["parameters"]) <= names, link


def test_a_link_to_a_parameter_that_does_not_exist_is_refused() -> None:
    broken = Answer("x", links={"Nowhere": Link("read", {"no_such_parameter": "$request.body#/a"})})
    endpoint = replace(api.endpoints[0], answers={201: broken})
    with pytest.raises(ValueError, match="link Nowhere"):
        document([endpoint, *api.endpoints[1:]], Config())


def test_the_key_enum_follows_the_keys_file_table(
    make_app: Callable[..., Flask], db_uri: str, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(
        '[keys.new_comment]\nin_app = true\nemail = "never"\n'
        '[keys.account_closed]\nin_app = false\nemail = "always"\nmandatory = true\n'
    )
    config = Config.from_env(
        {"KEYS_FILE": str(keys_file), "DB_URI": db_uri, "DEV_MAIL_SINK": "true"}
    )
    client = make_app(replace(config, dispatcher_threads=0)).test_client()
    doc = client.get("/openapi.json").get_json()
    validate(doc)
    body = doc["components"]["schemas"]["CreateRequest"]["properties"]["key"]
    assert body["enum"] == ["new_comment", "account_closed"]
    list_key = next(p for p in doc["paths"]["/list"]["get"]["parameters"] if p.get("name") == "key")
    assert list_key["schema"]["enum"] == ["new_comment", "account_closed"]
    # /docs renders the document the app serves, so it shows the same table.
    assert "openapi.json" in client.get("/docs/docs.js").get_data(as_text=True)
    # The default table's document is another app's: nothing of this one leaked into it.
    default = document(api.endpoints, Config())
    assert default["components"]["schemas"]["CreateRequest"]["properties"]["key"]["enum"] == [
        "registration", "new_message", "new_post", "new_login",
    ]  # fmt: skip
