"""The state repo's file layout and its YAML reading and writing.

    mailstate.yaml                       Settings (`format: 1` or `2`)
    nodes.yaml                           NodesFile
    domains/<bb>/<domain>.yaml           DomainFile, bb = the domain's first two characters
    projects/<pp>/<project_id>.yaml      ProjectFile (a project's plan limits), pp = the id's first two digits
    rendered/...                         compiler output (see compiler.render)

Format 2 gives every mailbox an immutable `id` (`<yyyymmdd>-<6 hex>`); format 1 has none.
A domain file does not name its format, so the loaders check it against mailstate.yaml
(`format_problems`). A mailstate.yaml without a `format` key is format 1 (the first format;
files written before the key existed are older than format 2).

Domain files fan out into two-character folders so that a commit rewrites a few small git
trees instead of one tree with an entry per domain.

Reads use PyYAML's C loader (fast). Writes emit canonical YAML (stable key order, one
mailbox per block) unless the current file carries comments: then ruamel.yaml's round-trip
mode rewrites it so that the comments an admin wrote survive.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from mailstate.state.errors import StateInvalid, StoreError
from mailstate.state.models import DomainFile, Filter, Mailbox, NodesFile, ProjectFile, Settings, SpamPolicy

SETTINGS_PATH = "mailstate.yaml"
NODES_PATH = "nodes.yaml"
DOMAINS_DIR = "domains"
PROJECTS_DIR = "projects"
RENDERED_DIR = "rendered"

try:  # the C loader is ~10x faster; fall back so a machine without libyaml still works
    _Loader: Any = yaml.CSafeLoader
    _Dumper: Any = yaml.CSafeDumper
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader
    _Dumper = yaml.SafeDumper

_MERGE = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(_Loader):  # type: ignore[misc]  # the C loader when libyaml is there
    """The safe loader, refusing duplicate keys: YAML would silently keep the last one, so a
    second `info:` block in a pull request would quietly replace the first mailbox."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        merged = any(key.tag == _MERGE for key, _ in node.value)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        if not merged and len(mapping) != len(node.value):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return mapping


def bucket(domain: str) -> str:
    """The fan-out folder of a domain: its first two characters."""
    return domain[:2]


def domain_path(domain: str) -> str:
    """Repo path of a domain's state file."""
    return f"{DOMAINS_DIR}/{bucket(domain)}/{domain}.yaml"


def domain_from_path(path: str) -> str | None:
    """The domain a `domains/<bb>/<domain>.yaml` path names, or None for any other path."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != DOMAINS_DIR or not parts[2].endswith(".yaml"):
        return None
    return parts[2][: -len(".yaml")]


def project_path(project_id: int) -> str:
    """Repo path of a project's file (its plan limits), fanned out like the domains."""
    return f"{PROJECTS_DIR}/{str(project_id)[:2]}/{project_id}.yaml"


def project_from_path(path: str) -> int | None:
    """The project id a `projects/<pp>/<id>.yaml` path names, or None for any other path."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != PROJECTS_DIR or not parts[2].endswith(".yaml"):
        return None
    text = parts[2][: -len(".yaml")]
    if not text.isdigit() or text.startswith("0") or len(text) > 19:
        return None
    return int(text)


def parse_project(data: bytes | str, path: str) -> ProjectFile:
    """A project file → ProjectFile, checking that the file name matches its project_id."""
    project: ProjectFile = _validated(ProjectFile, load_yaml(data, path), path)
    if project_path(project.project_id) != path:
        raise StateInvalid(
            f"{path}: holds project {project.project_id}, which belongs in {project_path(project.project_id)}"
        )
    return project


def dump_project(project: ProjectFile, previous: bytes | None = None) -> bytes:
    """ProjectFile → YAML (the limits that are set, in their canonical order), keeping comments."""
    data = {"project_id": project.project_id, "limits": project.limits.values()}
    return _dump_preserving(data, previous, project_path(project.project_id))


def load_yaml(data: bytes | str, path: str) -> Any:
    """Parse YAML with the fast safe loader; a syntax error becomes StateInvalid."""
    try:
        return yaml.load(data, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise StateInvalid(f"{path}: not valid YAML: {exc}", problems=[f"{path}: not valid YAML: {exc}"]) from exc


def _validated(model: Any, raw: Any, path: str) -> Any:
    try:
        return model.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        problems = [
            f"{path}: {'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        raise StateInvalid(problems[0], problems=problems) from None


def parse_settings(data: bytes | str) -> Settings:
    """mailstate.yaml → Settings (no `format` key: format 1)."""
    raw = load_yaml(data, SETTINGS_PATH)
    if isinstance(raw, dict) and "format" not in raw:
        raw = {**raw, "format": 1}
    result: Settings = _validated(Settings, raw, SETTINGS_PATH)
    return result


FITS_FORMAT_1 = 1  # no mailbox has an id
FITS_FORMAT_2 = 2  # every mailbox has an id, and no two share one


def format_fits(dom: DomainFile) -> int:
    """Which formats' mailbox-id rule `dom` keeps, as FITS_FORMAT_* bits (an empty domain
    keeps both). The parse cache stores it, so a start checks the rule without parsing."""
    ids = [box.id for box in dom.mailboxes.values()]
    fits = 0 if any(ids) else FITS_FORMAT_1
    if None not in ids and len(set(ids)) == len(ids):
        fits |= FITS_FORMAT_2
    return fits


def format_bit(fmt: int) -> int:
    """The FITS_FORMAT_* bit a domain needs under state format `fmt`."""
    return FITS_FORMAT_2 if fmt >= 2 else FITS_FORMAT_1


def format_problems(fmt: int, domains: Iterable[DomainFile]) -> list[str]:
    """What breaks the rule of format `fmt`: format 2 needs an id on every mailbox, format 1
    allows none; ids are unique within a domain (two mailboxes may never share a home)."""
    problems: list[str] = []
    bit = format_bit(fmt)
    for dom in domains:
        # The common case in one pass without building messages (100k mailboxes: a few ms).
        if format_fits(dom) & bit:
            continue
        path = domain_path(dom.domain)
        seen: set[str] = set()
        for local, box in dom.mailboxes.items():
            if fmt >= 2 and box.id is None:
                problems.append(
                    f"{path}: mailboxes.{local}.id: required in state format {fmt} (run `mailstate upgrade`)"
                )
            elif fmt < 2 and box.id is not None:
                problems.append(
                    f"{path}: mailboxes.{local}.id: not allowed in state format {fmt}; set `format: 2` in {SETTINGS_PATH}"
                )
            elif box.id is not None:
                if box.id in seen:
                    problems.append(
                        f"{path}: mailboxes.{local}.id: {box.id} is used by another mailbox of {dom.domain}"
                    )
                seen.add(box.id)
    return problems


def parse_nodes(data: bytes | str) -> NodesFile:
    """nodes.yaml → NodesFile."""
    result: NodesFile = _validated(NodesFile, load_yaml(data, NODES_PATH), NODES_PATH)
    return result


# The canonical form dump_domain writes, read without a YAML parser. Loading 20k domain files
# with PyYAML takes ~2.8 s (most of a cold start at 100k mailboxes); these regexes take ~0.4 s.
# Anything else (comments, other quoting or order, duplicates) goes to the YAML loader, and a
# property test checks that both readers agree wherever the fast one answers.
_RESOLVER = yaml.resolver.Resolver()


def _yaml11_tag(text: str) -> str:
    """The tag YAML 1.1 gives `text` as a plain scalar (str, int, bool, null, ...)."""
    tag: str = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
    return tag


_HEAD = re.compile(
    rb"domain: ([a-z0-9][a-z0-9.-]*)\nproject_id: (null|[1-9][0-9]*)\nemail_enabled: (true|false)\n"
    rb"(?:alias_of: ([a-z0-9][a-z0-9.-]*)\n)?(?:home: ([a-z0-9][a-z0-9-]*)\n)?(?:moving_to: ([a-z0-9][a-z0-9-]*)\n)?"
    rb"(?:moved_from: ([a-z0-9][a-z0-9-]*)\n)?(?:replica: ([a-z0-9][a-z0-9-]*)\n)?mailboxes:( \{\})?\n"
)
_PLACEMENT_KEYS = ("home", "moving_to", "moved_from", "replica")
# An address in a block list (aliases, forward_to): `<local>@<domain>`, which YAML always reads
# as a string (it holds an `@`); the optional keys of state.aliases.
_ADDRESSES = rb"(?:- [a-z0-9][a-z0-9._+-]*@[a-z0-9][a-z0-9.-]*\n)+"
_BOX = re.compile(
    rb"  ([a-z0-9][a-z0-9._+-]*|'[a-z0-9][a-z0-9._+-]*'):\n(?:    id: ([0-9]{8}-[0-9a-f]{6})\n)?"
    rb"    password: '([^'\n]*)'\n    quota_mb: ([1-9][0-9]*)\n    active: (true|false)\n"
    rb"(?:    forward_to:\n((?:    - [a-z0-9][a-z0-9._+-]*@[a-z0-9][a-z0-9.-]*\n)+)    keep_copy: (true|false)\n)?"
)
_ALIAS = re.compile(
    rb"  ([a-z0-9][a-z0-9._+-]*|'[a-z0-9][a-z0-9._+-]*'|'@'):\n(" + _ADDRESSES.replace(rb"(?:- ", rb"(?:  - ") + rb")"
)


def _address_list(block: bytes, indent: int) -> list[str]:
    return [line[indent + 2 :].decode() for line in block.split(b"\n") if line]


def _plain_str(raw: bytes) -> str | None:
    if raw[:1] == b"'":
        return raw[1:-1].decode()
    text = raw.decode()
    # A plain scalar is a string only if YAML 1.1 would not read it as a number, bool or null.
    return text if _yaml11_tag(text) == "tag:yaml.org,2002:str" else None


def parse_canonical_domain(data: bytes) -> dict[str, Any] | None:
    """The data of a domain file in exactly the canonical form, or None (use the YAML loader)."""
    head = _HEAD.match(data)
    name = head and _plain_str(head.group(1))
    if not head or not name:
        return None
    pos, boxes = head.end(), {}
    if head.group(9) is None:
        while pos < len(data) and not data.startswith(b"aliases:\n", pos):
            box = _BOX.match(data, pos)
            local = box and _plain_str(box.group(1))
            if not box or not local or local in boxes:
                return None
            entry: dict[str, Any] = {} if box.group(2) is None else {"id": box.group(2).decode()}
            entry.update(password=box.group(3).decode(), quota_mb=int(box.group(4)), active=box.group(5) == b"true")
            if box.group(6) is not None:
                entry.update(forward_to=_address_list(box.group(6), 4), keep_copy=box.group(7) == b"true")
            boxes[local] = entry
            pos = box.end()
        if not boxes:
            return None
    aliases: dict[str, list[str]] = {}
    if data.startswith(b"aliases:\n", pos):
        pos += len(b"aliases:\n")
        while pos < len(data):
            alias = _ALIAS.match(data, pos)
            key = alias and ("@" if alias.group(1) == b"'@'" else _plain_str(alias.group(1)))
            if not alias or not key or key in aliases:
                return None
            aliases[key] = _address_list(alias.group(2), 2)
            pos = alias.end()
        if not aliases:
            return None
    if pos != len(data):
        return None
    pid = head.group(2)
    out: dict[str, Any] = {
        "domain": name,
        "project_id": None if pid == b"null" else int(pid),
        "email_enabled": head.group(3) == b"true",
    }
    if head.group(4) is not None:
        alias_of = _plain_str(head.group(4))
        if not alias_of:
            return None
        out["alias_of"] = alias_of
    for group, key in enumerate(_PLACEMENT_KEYS, 5):
        if head.group(group) is not None:
            node = _plain_str(head.group(group))
            if not node:
                return None
            out[key] = node
    out["mailboxes"] = boxes
    if aliases:
        out["aliases"] = aliases
    return out


def parse_domain(data: bytes | str, path: str, fmt: int | None = None) -> DomainFile:
    """A domain file → DomainFile, checking that the file name matches the domain, and with
    `fmt` given, that its mailboxes follow that state format (see `format_problems`)."""
    raw = parse_canonical_domain(data if isinstance(data, bytes) else data.encode())
    domain: DomainFile = _validated(DomainFile, raw if raw is not None else load_yaml(data, path), path)
    if domain_path(domain.domain) != path:
        raise StateInvalid(
            f"{path}: holds domain {domain.domain!r}, which belongs in {domain_path(domain.domain)}",
        )
    if fmt is not None:
        problems = format_problems(fmt, [domain])
        if problems:
            raise StateInvalid(problems[0], problems=problems)
    return domain


# --- writing -----------------------------------------------------------------------------


class _TextDumper(_Dumper):  # type: ignore[misc]  # the C dumper when libyaml is there
    """The canonical dumper, writing a multi-line text (a vacation reply) as a `|` block, which
    people read and edit like the text itself (PyYAML falls back to quotes where a block cannot
    hold the text exactly, e.g. trailing spaces). No other value holds a newline."""


def _represent_str(dumper: Any, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_TextDumper.add_representer(str, _represent_str)


def _plain(data: Any) -> str:
    out: str = yaml.dump(
        data, Dumper=_TextDumper, sort_keys=False, default_flow_style=False, allow_unicode=False, width=1000
    )
    return out


def dump_settings(settings: Settings) -> bytes:
    """Settings → canonical mailstate.yaml (format 1 keeps its old keys: no purge_after_days; no
    `dns:` block unless one is set, so repos without one keep their bytes)."""
    data = settings.model_dump(mode="json", exclude_none=True)
    if settings.format < 2:
        data.pop("purge_after_days")
    if settings.dns is not None:
        data["dns"] = settings.dns.dump()
    if settings.sending is not None:
        data["sending"] = settings.sending.model_dump(mode="json")  # null values stay: null means "no limit"
    return _plain(data).encode()


def dump_nodes(nodes: NodesFile, previous: bytes | None = None) -> bytes:
    """NodesFile → nodes.yaml, keeping comments of `previous` when it has any. `address` and
    `tls_certificate` are written only when set, so a nodes.yaml from before them keeps its bytes."""
    data = {
        "nodes": {
            name: {
                k: val
                for k, val in node.model_dump(mode="json").items()
                if val is not None or k not in ("address", "tls_certificate")
            }
            for name, node in sorted(nodes.nodes.items())
        }
    }
    return _dump_preserving(data, previous, NODES_PATH)


def domain_document(domain: DomainFile) -> dict[str, Any]:
    """The plain data of a domain file, in the canonical key order."""
    doc: dict[str, Any] = {
        "domain": domain.domain,
        "project_id": domain.project_id,
        "email_enabled": domain.email_enabled,
    }
    # The alias keys are optional (state.aliases): a file without them stays byte-identical.
    if domain.alias_of is not None:
        doc["alias_of"] = domain.alias_of
    if domain.limits:
        doc["limits"] = domain.limits.values()
    # Inbound protection (state/spam.py): optional, so a domain without them keeps its bytes.
    _spam_keys(doc, domain.spam_policy, domain.sender_rules)
    # So are the placement keys (docs/fleet.md): a domain without a home keeps its bytes.
    for key in _PLACEMENT_KEYS:
        if getattr(domain, key) is not None:
            doc[key] = getattr(domain, key)
    doc["mailboxes"] = {local: _box_document(box) for local, box in sorted(domain.mailboxes.items())}
    if domain.aliases:
        # One alias per block, sorted ('@', the catch-all, first); destinations keep their order.
        doc["aliases"] = {key: list(dests) for key, dests in sorted(domain.aliases.items())}
    return doc


def _box_document(box: Mailbox) -> dict[str, Any]:
    # The id goes first (it names the mailbox); a format-1 mailbox has none and keeps its
    # old three keys, so format-1 files stay byte-identical.
    head: dict[str, Any] = {} if box.id is None else {"id": box.id}
    doc = {**head, "password": box.password, "quota_mb": box.quota_mb, "active": box.active}
    if box.forward_to is not None:
        doc.update(forward_to=list(box.forward_to), keep_copy=box.keep_copy)
    # What owners ask for (state/owners.py): optional, so a mailbox without them keeps its bytes.
    if box.vacation is not None:
        doc["vacation"] = box.vacation.model_dump(mode="json", exclude_none=True)
    if box.filters is not None:
        doc["filters"] = [_filter_document(f) for f in box.filters]
    if box.app_passwords is not None:
        doc["app_passwords"] = {
            name: entry.model_dump(mode="json") for name, entry in sorted(box.app_passwords.items())
        }
    if box.sending is not None:
        doc["sending"] = box.sending.model_dump(mode="json", exclude_none=True)
    _spam_keys(doc, box.spam_policy, box.sender_rules)
    return doc


def _spam_keys(doc: dict[str, Any], policy: SpamPolicy | None, rules: Mapping[str, str] | None) -> None:
    """A domain's or a mailbox's spam policy (null fields left out: inherited) and sender rules (sorted)."""
    if policy is not None:
        doc["spam_policy"] = policy.model_dump(mode="json", exclude_none=True)
    if rules is not None:
        doc["sender_rules"] = dict(sorted(rules.items()))


def _filter_document(rule: Filter) -> dict[str, Any]:
    doc = rule.model_dump(mode="json", exclude_none=True)
    if not rule.stop:
        del doc["stop"]
    return doc


def dump_domain(domain: DomainFile, previous: bytes | None = None) -> bytes:
    """DomainFile → YAML, keeping comments of `previous` when it has any."""
    return _dump_preserving(domain_document(domain), previous, domain_path(domain.domain))


def _dump_preserving(data: dict[str, Any], previous: bytes | None, path: str) -> bytes:
    if previous is None or b"#" not in previous:
        return _plain(data).encode()
    text = _round_trip(data, previous, path)
    # ruamel speaks YAML 1.2 and readers use PyYAML (1.1): make sure both read the same data,
    # so that a key such as `on` or `yes` can never turn into a boolean on the next load.
    if load_yaml(text, path) != data:
        raise StoreError(f"{path}: comment-preserving rewrite did not round-trip; file left unchanged")
    return text.encode()


def _ruamel() -> YAML:
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 1000
    rt.indent(mapping=2, sequence=4, offset=2)
    return rt


def _key(text: str) -> Any:
    # A key that YAML 1.1 would read as something else than a string gets quoted.
    tag = _yaml11_tag(text)
    return text if tag == "tag:yaml.org,2002:str" else DoubleQuotedScalarString(text)


def _merge(target: CommentedMap, data: dict[str, Any]) -> None:
    """Make `target` equal `data`, keeping the keys (and their comments) that stay."""
    for key in [k for k in target if k not in data]:
        del target[key]
    # Collections (mailboxes, nodes) come sorted by name; records (a mailbox's fields) come
    # in their canonical field order, which new keys must follow instead of the alphabet.
    collection = list(data) == sorted(data)
    position = 0
    for key, value in data.items():
        if isinstance(value, dict):
            existing = target.get(key)
            if not isinstance(existing, CommentedMap):
                existing = CommentedMap()
                if key in target:
                    target[key] = existing
                else:
                    target.insert(_insert_at(target, key, position, collection), _key(key), existing)
            _merge(existing, value)
        elif key in target and isinstance(value, list) and isinstance(target[key], list):
            # A list (an alias's destinations) is changed in place: comments attached to it stay.
            _merge_list(target[key], value)
        elif key in target:
            current = target[key]
            # True == 1, so compare types too; a quoted string loads as a str subclass,
            # which is the same value and keeps its quotes.
            same_type = type(current) is type(value) or (isinstance(current, str) and isinstance(value, str))
            if current != value or not same_type:
                target[key] = _scalar(value)
        else:
            target.insert(_insert_at(target, key, position, collection), _key(key), _scalar(value))
        position += 1


def _merge_list(current: list[Any], value: list[Any]) -> None:
    """Make `current` equal `value` by deleting and inserting items, so the items that stay keep their comments."""
    for i in reversed(range(len(current))):
        if current[i] not in value:
            del current[i]
    for i, item in enumerate(value):
        if i < len(current) and current[i] == item:
            continue
        if item in current:
            del current[current.index(item)]
        current.insert(i, _scalar(item))
    del current[len(value) :]


def _scalar(value: Any) -> Any:
    # ruamel writes YAML 1.2; a string such as the IPv6 address 1:2:3:4:5:6:7:8 is plain
    # there but a (base-60) integer to the YAML 1.1 reader, so quote it like a key.
    return _key(value) if isinstance(value, str) else value


def _insert_at(target: CommentedMap, key: str, position: int, collection: bool) -> int:
    # New mailboxes go in sorted place among the existing ones so that files stay ordered.
    keys = list(target.keys())
    if collection and all(isinstance(k, str) for k in keys) and keys == sorted(keys):
        return sum(1 for k in keys if k < key)
    return min(position, len(keys))


def _round_trip(data: dict[str, Any], previous: bytes, path: str) -> str:
    rt = _ruamel()
    try:
        doc = rt.load(previous)
    except Exception as exc:  # ruamel raises many unrelated classes
        raise StoreError(f"{path}: could not re-read the current file to keep its comments") from exc
    if not isinstance(doc, CommentedMap):
        doc = CommentedMap()
    _merge(doc, data)
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()
