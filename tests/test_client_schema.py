"""The client cannot drift from the server: its response models accept exactly the fields the
server's OpenAPI schema declares, with compatible JSON types, and its methods send every field
the server's requests take."""

from __future__ import annotations

import inspect
from typing import Any

import gradindex_client
import pytest
from gradindex_client import AsyncClient, Client
from pydantic import BaseModel

from gradindex.server import ServerSettings, create_app

Schema = dict[str, Any]

CLIENT_MODELS = ["Example", "ExamplePage", "Health", "IndexDetail", "IndexSummary",
                 "InfluenceResponse", "InfluenceResult", "ScoresResponse", "SelectResponse",
                 "SelfInfluencePage", "TrainingExample", "Whoami"]
"""Every response model of the client; each has the server's model of the same name."""

RESPONSES = [
    ("get", "/v1/health", "Health"),
    ("get", "/v1/indexes/{name}", "IndexDetail"),
    ("post", "/v1/indexes/{name}/influence", "InfluenceResponse"),
    ("post", "/v1/indexes/{name}/scores", "ScoresResponse"),
    ("post", "/v1/indexes/{name}/select", "SelectResponse"),
    ("get", "/v1/indexes/{name}/self-influence", "SelfInfluencePage"),
    ("get", "/v1/indexes/{name}/examples/{example_id}", "TrainingExample"),
    ("get", "/v1/indexes/{name}/examples", "ExamplePage"),
    ("get", "/v1/whoami", "Whoami"),
]
"""Route → the client model its method parses the answer with."""

WRAPPED = [
    ("get", "/v1/indexes", "indexes", "IndexSummary"),
    ("delete", "/v1/indexes/{name}/examples/{example_id}", "deleted", "TrainingExample"),
]
"""Routes whose answer the client unwraps: route, the key it reads, the model of its value."""

REQUESTS = [
    ("post", "/v1/indexes/{name}/influence", "influence"),
    ("post", "/v1/indexes/{name}/scores", "scores"),
    ("post", "/v1/indexes/{name}/select", "select"),
    ("get", "/v1/indexes/{name}/self-influence", "self_influence"),
    ("get", "/v1/indexes/{name}/examples", "examples"),
]
"""Route → the client method that calls it (body fields or query parameters = arguments)."""

RENAMED = {("scores", "strict"): "missing"}
"""(method, argument) → the field it sends: ``scores(strict=True)`` sends ``missing: error``
(a flag reads better than the server's enum in Python)."""


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> Schema:
    """The server's OpenAPI schema (the app is built, not started)."""
    data_dir = tmp_path_factory.mktemp("schema") / "data"
    schema: Schema = create_app(ServerSettings(data_dir=data_dir)).openapi()
    return schema


# ------------------------------------------------------------------ comparing JSON schemas

_KEYWORDS = ("type", "anyOf", "oneOf", "allOf", "$ref", "enum", "const")


def _branches(schema: Schema) -> list[Schema]:
    """The alternatives of a schema: ``anyOf``/``oneOf`` flattened, a one-item ``allOf`` and a
    list of types unwrapped."""
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return [b for s in schema[key] for b in _branches(s)]
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return _branches(schema["allOf"][0])
    if isinstance(schema.get("type"), list):
        return [{**schema, "type": t} for t in schema["type"]]
    return [schema]


def _ref(schema: Schema) -> str | None:
    ref = schema.get("$ref")
    return None if ref is None else str(ref).rsplit("/", 1)[-1]


def _values(schema: Schema) -> set[Any] | None:
    if "const" in schema:
        return {schema["const"]}
    if "enum" in schema:
        return set(schema["enum"])
    return None


def describe(schema: Schema) -> str:
    """A schema's JSON type in a few words: ``integer | null``, ``array of Example``."""
    if not any(k in schema for k in _KEYWORDS):
        return "any"
    parts = []
    for b in _branches(schema):
        ref, kind, values = _ref(b), b.get("type"), _values(b)
        if ref is not None:
            parts.append(ref)
        elif kind == "array":
            parts.append(f"array of {describe(b.get('items', {}))}")
        elif values is not None:
            parts.append(f"{kind} in {sorted(values, key=str)}")
        else:
            parts.append(f"{kind}" + (f" ({b['format']})" if "format" in b else ""))
    return " | ".join(parts)


def _additional(schema: Schema) -> Schema:
    extra = schema.get("additionalProperties", True)
    return {} if extra is True else dict(extra)


def accepts(client: Schema, server: Schema) -> bool:
    """Whether every value ``server`` allows is one ``client`` accepts (the client may be
    looser: ``str`` for an enum, ``number`` for an integer, ``Any`` for anything)."""
    if not any(k in client for k in _KEYWORDS):
        return True
    return all(any(_accepts_one(c, s) for c in _branches(client)) for s in _branches(server))


def _accepts_one(client: Schema, server: Schema) -> bool:
    if not any(k in client for k in _KEYWORDS):
        return True
    if not any(k in server for k in _KEYWORDS):
        return False  # the server may send anything, the client takes less
    if "$ref" in client or "$ref" in server:
        return _ref(client) == _ref(server)  # the same model; each is compared on its own
    kind, sent = client.get("type"), server.get("type")
    if kind != sent and not (kind == "number" and sent == "integer"):
        return False
    wanted, allowed = _values(client), _values(server)
    if wanted is not None and (allowed is None or not allowed <= wanted):
        return False
    if "format" in client and client["format"] != server.get("format"):
        return False
    if kind == "array":
        return accepts(client.get("items", {}), server.get("items", {}))
    if kind == "object":
        return accepts(_additional(client), _additional(server))
    return True


def drift(model: str, client: Schema, server: Schema) -> list[str]:
    """What keeps the client's ``model`` from reading every answer the server's may hold."""
    problems = []
    client_fields, server_fields = client["properties"], server["properties"]
    client_required, server_required = set(client.get("required", [])), set(
        server.get("required", []))
    for field, sent in server_fields.items():
        if field not in client_fields:
            problems.append(f"{model}.{field}: the server sends it ({describe(sent)}), the "
                            "client model lacks it")
            continue
        taken = client_fields[field]
        if not accepts(taken, sent):
            problems.append(f"{model}.{field}: the server sends {describe(sent)}, the client "
                            f"accepts {describe(taken)}")
        if field in client_required and field not in server_required:
            problems.append(f"{model}.{field}: the server may leave it out, the client "
                            "requires it")
    for field in client_fields.keys() - server_fields.keys():
        problems.append(f"{model}.{field}: the client declares it, the server's {model} lacks "
                        "it")
    return problems


def _client_schema(model: type[BaseModel]) -> Schema:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def _refs(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        found = {str(schema["$ref"]).rsplit("/", 1)[-1]} if "$ref" in schema else set()
        return found.union(*[_refs(v) for k, v in schema.items() if k != "$defs"])
    if isinstance(schema, list):
        return set().union(*[_refs(v) for v in schema])
    return set()


# ------------------------------------------------------------------ the checks


@pytest.mark.parametrize("name", CLIENT_MODELS)
def test_client_model_matches_the_servers(name: str, openapi: Schema) -> None:
    model = getattr(gradindex_client, name)
    server = openapi["components"]["schemas"].get(name)
    assert server is not None, f"the server's schema has no model {name}"
    client = _client_schema(model)
    problems = drift(name, client, server)
    assert problems == [], "the client drifted from the server:\n" + "\n".join(problems)
    # Models a field points to are compared too: each is one of the client's models.
    assert _refs(client["properties"]) <= set(CLIENT_MODELS)


def test_every_client_model_is_checked() -> None:
    models = [n for n in gradindex_client.__all__
              if inspect.isclass(getattr(gradindex_client, n))
              and issubclass(getattr(gradindex_client, n), BaseModel)]
    assert sorted(models) == CLIENT_MODELS


@pytest.mark.parametrize("method,path,name", RESPONSES)
def test_each_route_answers_with_the_model_the_client_parses(method: str, path: str,
                                                             name: str, openapi: Schema) -> None:
    answer = openapi["paths"][path][method]["responses"]["200"]
    assert _ref(answer["content"]["application/json"]["schema"]) == name


@pytest.mark.parametrize("method,path,key,name", WRAPPED)
def test_unwrapped_answers_hold_the_key_the_client_reads(method: str, path: str, key: str,
                                                         name: str, openapi: Schema) -> None:
    wrapper = _ref(openapi["paths"][path][method]["responses"]["200"]["content"][
        "application/json"]["schema"])
    assert wrapper is not None
    schema = openapi["components"]["schemas"][wrapper]
    assert key in schema["required"]
    assert name in describe(schema["properties"][key])


def _sent(openapi: Schema, method: str, path: str) -> set[str]:
    """The body fields (or query parameters) a route takes."""
    operation = openapi["paths"][path][method]
    if "requestBody" in operation:
        body = _ref(operation["requestBody"]["content"]["application/json"]["schema"])
        assert body is not None
        return set(openapi["components"]["schemas"][body]["properties"])
    return {p["name"] for p in operation["parameters"] if p["in"] == "query"}


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize("method,path,call", REQUESTS)
def test_client_methods_take_every_field_the_server_does(
        method: str, path: str, call: str, cls: type[Client | AsyncClient],
        openapi: Schema) -> None:
    taken = {RENAMED.get((call, a), a)
             for a in inspect.signature(getattr(cls, call)).parameters} - {"self", "name"}
    sent = _sent(openapi, method, path)
    assert taken == sent, (f"{cls.__name__}.{call} lacks {sorted(sent - taken)} (the server "
                           f"takes them) and has {sorted(taken - sent)} (the server does not)")


# ------------------------------------------------------------------ the check finds drift


class _Drifted(BaseModel):
    id: int  # the server sends a string
    payload: Any
    meta: list[Any]  # an object on the server
    self_influence: float
    render: dict[str, Any]  # required, but the server may leave it out
    rank: int  # the server has no such field
    prediction: int | None = None
    confidence: float | None = None
    loss: float | None = None


def test_the_check_names_the_model_and_each_field_a_client_model_got_wrong(
        openapi: Schema) -> None:
    server = openapi["components"]["schemas"]["TrainingExample"]
    problems = drift("TrainingExample", _client_schema(_Drifted), server)
    assert problems == [
        "TrainingExample.id: the server sends string, the client accepts integer",
        "TrainingExample.meta: the server sends object, the client accepts array of any",
        "TrainingExample.render: the server sends object | null, the client accepts object",
        "TrainingExample.render: the server may leave it out, the client requires it",
        "TrainingExample.rank: the client declares it, the server's TrainingExample lacks it",
    ]


SERVER_CHANGES: list[tuple[str, Schema, str]] = [
    ("weight", {"type": "number"},
     "TrainingExample.weight: the server sends it (number), the client model lacks it"),
    ("self_influence", {"anyOf": [{"type": "number"}, {"type": "null"}]},
     "TrainingExample.self_influence: the server sends number | null, the client accepts "
     "number"),
    ("meta", {"type": "object", "additionalProperties": {"type": "string"}}, ""),
]


@pytest.mark.parametrize("field,schema,message", SERVER_CHANGES)
def test_the_check_names_the_field_the_server_changed(field: str, schema: Schema,
                                                      message: str, openapi: Schema) -> None:
    server = openapi["components"]["schemas"]["TrainingExample"]
    changed = {**server, "properties": {**server["properties"], field: schema}}
    problems = drift("TrainingExample", _client_schema(gradindex_client.TrainingExample),
                     changed)
    assert problems == ([message] if message else [])  # a narrower server type is no drift


def test_looser_client_types_are_compatible() -> None:
    assert accepts({"type": "string"}, {"type": "string", "const": "ok"})
    assert accepts({"type": "number"}, {"type": "integer"})
    assert accepts({}, {"type": "object"})
    assert accepts({"anyOf": [{"type": "integer"}, {"type": "null"}]}, {"type": "integer"})
    assert not accepts({"type": "integer"}, {"type": "number"})
    assert not accepts({"type": "string", "enum": ["a"]}, {"type": "string", "enum": ["a", "b"]})
    assert not accepts({"type": "array", "items": {"type": "integer"}},
                       {"type": "array", "items": {"type": "string"}})
    assert not accepts({"$ref": "#/components/schemas/Example"},
                       {"$ref": "#/components/schemas/TrainingExample"})
