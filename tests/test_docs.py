"""The operator docs say what the code does.

docs/configuration.md names every key of the schema with its real default and reload
behaviour, and nothing else; the docs' links, metric names, config keys and command lines
exist; the README links the docs.
"""

from __future__ import annotations

import argparse
import re
import shlex
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import generate_latest
from pydantic import BaseModel

from proxy import reload
from proxy.cli.main import _parser
from proxy.config import GatewayConfig, SecretRef, parse_config
from proxy.workers.group_admin import SUPERVISOR_REGISTRY, Member, build_group_admin_app
from tests.conftest import GatewayHandle

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OURS = ("configuration.md", "operations.md", "security.md", "migrating.md")
CONFIGURATION = DOCS / "configuration.md"
RELOAD_VALUES = ("applied", "restart", "at start")


def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


# --- the schema ------------------------------------------------------------------------


def _element_model(annotation: object) -> type[BaseModel] | None:
    """The model inside ``tuple[Model, ...]``, if that is what ``annotation`` is."""
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0]
    return None


def _value_model(annotation: object) -> type[BaseModel] | None:
    """The model inside ``dict[str, Model]`` (``classes``: one per name), if that it is."""
    if typing.get_origin(annotation) is dict:
        args = typing.get_args(annotation)
        model = args[1] if len(args) == 2 else None
        if isinstance(model, type) and issubclass(model, BaseModel) and model is not SecretRef:
            return model
    return None


def schema_keys(model: type[BaseModel] = GatewayConfig, prefix: str = "") -> dict[str, Any]:
    """Every key an operator writes, dotted (``upstream.limits[].requests``), with its field.

    Sections (``upstream``, ``queue``) are not keys of their own: their keys are. A secret
    (``{env}``/``{file}``) and a map of secrets (``extra_keys``) are one key each.
    """
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        if (
            isinstance(annotation, type)
            and issubclass(annotation, BaseModel)
            and annotation is not SecretRef
        ):
            keys |= schema_keys(annotation, path + ".")
            continue
        keys[path] = field
        element = _element_model(annotation)
        if element is not None:
            keys |= schema_keys(element, path + "[].")
        value = _value_model(annotation)
        if value is not None:  # a map of models by name: ``classes.NAME.weight``
            keys |= schema_keys(value, path + ".NAME.")
    return keys


# --- configuration.md -----------------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def key_rows() -> dict[str, dict[str, str]]:
    """The rows of every ``| key | default | on SIGHUP | ... |`` table, by key."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in CONFIGURATION.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set("".join(cells)) <= set("-: ") or header[:2] != ["key", "default"]:
            continue
        key = re.fullmatch(r"`([^`]+)`", cells[0])
        assert key, f"a key cell is one code span: {line}"
        assert key.group(1) not in rows, f"{key.group(1)} documented twice"
        rows[key.group(1)] = dict(zip(header, cells, strict=True))
    return rows


def nested(path: str, value: object) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for ``"a.b"``."""
    head, _, rest = path.partition(".")
    return {head: nested(rest, value) if rest else value}


def test_configuration_names_every_schema_key_and_no_other() -> None:
    documented = set(key_rows())
    schema = set(schema_keys())
    assert schema - documented == set(), "keys missing from docs/configuration.md"
    assert documented - schema == set(), "docs/configuration.md names keys the schema lacks"


def test_configuration_shows_the_real_defaults() -> None:
    fields = schema_keys()
    for key, row in key_rows().items():
        cell = row["default"]
        if fields[key].is_required():
            assert cell == "required", key
            continue
        value = re.fullmatch(r"`([^`]+)`", cell)
        assert value, f"{key}: the default is one code span, got {cell!r}"
        if ".NAME." in key:  # inside a named entry: its model's own default
            shown = yaml.safe_load(value.group(1))
            shown = tuple(shown) if isinstance(shown, list) else shown
            default = fields[key].get_default(call_default_factory=True)
            assert default == shown, f"{key}: {cell} is not the default"
            continue
        raw = nested(key, yaml.safe_load(value.group(1)))
        assert parse_config(raw) == GatewayConfig(), f"{key}: {cell} is not the default"


def test_configuration_reload_column_matches_what_sighup_does() -> None:
    for key, row in key_rows().items():
        top, _, rest = key.partition(".")
        leaf = rest.split(".")[0].split("[")[0]
        refused = (
            top in reload.RESTART_ONLY
            or top == "tokens"
            or (top == "upstream" and leaf in reload.RESTART_ONLY_UPSTREAM)
        )
        cell = row["on sighup"]
        assert cell in RELOAD_VALUES, f"{key}: {cell!r}"
        assert (cell == "restart") == refused, (
            f"{key}: a reload {'refuses' * refused or 'takes'} it"
        )


def config_fragments() -> Iterator[dict[str, Any]]:
    for block in re.findall(r"```yaml\n(.*?)```", CONFIGURATION.read_text(), flags=re.S):
        try:
            doc = yaml.safe_load(block)
        except yaml.YAMLError:
            continue
        top_level = set(GatewayConfig.model_fields)
        if isinstance(doc, dict) and set(doc) <= top_level:
            yield doc


def test_configuration_examples_validate() -> None:
    fragments = list(config_fragments())
    assert fragments, "at least the routes example"
    for doc in fragments:
        parse_config(doc)


# --- every doc of ours -------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^a-z0-9 -]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("name", OURS)
def test_links_resolve(name: str) -> None:
    path = DOCS / name
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.is_file(), f"{name}: link to {target}"
        if anchor:
            assert anchor in anchors(linked), f"{name}: no heading for #{anchor} in {file}"


def test_readme_links_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in OURS:
        assert f"](docs/{name})" in readme, f"README does not link docs/{name}"


@pytest.mark.parametrize(
    ("name", "topics"),
    [
        (
            "operations.md",
            (
                "deploy patterns",
                "sizing",
                "rotating the echowin key without downtime",
                "redis failure modes",
                "backing up the sqlite state",
                "upgrades",
            ),
        ),
        ("security.md", ("who can reach what", "tokens", "what is logged", "the admin listener")),
    ],
)
def test_docs_cover_their_topics(name: str, topics: tuple[str, ...]) -> None:
    headings = {h.lower() for h in re.findall(r"^#+ (.+)$", read(name), flags=re.M)}
    for topic in topics:
        assert topic in headings, f"{name}: no section on {topic}"


CONFIG_KEY = re.compile(r"`([a-z_]+(?:\.[a-z_]+(?:\[\])?)+)`")


@pytest.mark.parametrize("name", OURS)
def test_config_keys_named_exist(name: str) -> None:
    keys = set(schema_keys())
    sections = {k.split(".")[0] for k in keys if "." in k}  # not `state.db`: a file name
    for key in CONFIG_KEY.findall(read(name)):
        if key.split(".")[0] in sections:
            assert key in keys, f"{name}: `{key}` is not a config key"


def commands(text: str) -> Iterator[list[str]]:
    """The argument lists of every ``echowin-gateway <subcommand> ...`` in shell blocks."""
    subcommands = {"serve", "check-config", "token", "simulate", "quickstart", "status"}
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            # A lookahead, so `docker exec echowin-gateway echowin-gateway token ...` yields both.
            for match in re.finditer(r"(?=echowin-gateway ((?:[^|#;&)>]|&(?!&))+))", line):
                args = match.group(1)
                if args.split()[0] in subcommands:  # else a container or deployment name
                    yield shlex.split(args)


def strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The CLI's parser, refusing abbreviated options: the docs spell every flag out."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                strict(sub)
    return parser


@pytest.mark.parametrize("name", OURS)
def test_command_lines_parse(name: str) -> None:
    found = list(commands(read(name)))
    if name != "security.md":
        assert found, f"{name} shows no echowin-gateway command"
    for argv in found:
        try:
            strict(_parser()).parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: `echowin-gateway {' '.join(argv)}` does not parse")


class _EmptyGroup:
    workers: tuple[Member, ...] = ()
    links: Any = None


async def test_metrics_named_exist(gateway: GatewayHandle) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.admin_url("/metrics")) as resp,
    ):
        page = await resp.text()
    exported = set(re.findall(r"^# TYPE (\S+)", page, flags=re.M))
    exported |= set(re.findall(r"^([a-z_:][a-z0-9_:]*)", page, flags=re.M))
    # The supervisor of `serve --workers N` adds its own (an empty group: no worker runs).
    group = build_group_admin_app(_EmptyGroup())
    page = generate_latest(group[SUPERVISOR_REGISTRY]).decode()
    exported |= set(re.findall(r"^# TYPE (\S+)", page, flags=re.M))
    exported |= {n + "_total" for n in exported}
    for name in OURS:
        for metric in re.findall(r"\b(echowin_gateway_[a-z0-9_]+)", read(name)):
            assert metric in exported, f"{name}: {metric} is not on /metrics"


def test_every_test_the_docs_name_exists() -> None:
    """A threat list that cites ``tests/x.py::test_y`` (or ``::test_z`` after it) points at
    tests that exist: a renamed or deleted proof shows here, not in a reader's search."""
    cited = 0
    for doc in sorted(DOCS.glob("*.md")):
        for line in read(doc.name).splitlines():
            module = None
            for path, name in re.findall(r"(tests/[\w/]+\.py)?::(test_\w+)", line):
                module = path or module
                assert module, f"{doc.name}: ::{name} follows no test module"
                source = (ROOT / module).read_text(encoding="utf-8")
                assert f"def {name}(" in source, f"{doc.name}: {module}::{name} is not a test"
                cited += 1
    assert cited >= 10
