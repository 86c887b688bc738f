"""The domains of a snapshot: an immutable mapping that a write copies one bucket of, and whose
values may still be unparsed entries of the parse cache.

Two costs would otherwise grow with the state (200k domains / 1M mailboxes):

* A write would copy the whole name → domain dict for the new snapshot and free the old one
  when the snapshot is replaced, milliseconds each at 200k domains. Here the names are spread
  over `BUCKETS` dicts by their hash; a write copies the tuple of buckets and the buckets its
  change touches (~800 entries each at 200k domains), and snapshots share the rest.
* A start would build 1.2M pydantic models from the cache, most of a warm start at 1M, where
  a request reads a handful of domains. A value here may be a `Lazy`: where its bytes are in
  the parse cache, plus the fields the snapshot's indexes need (project, alias target) and
  whether it fits each state format. It becomes a `DomainFile` on first read, through its
  source, which checks the entry's MAC and falls back to parsing the blob from git.

Snapshots are immutable, so a bucket shared by several snapshots may still swap a `Lazy` for
the model it stands for: the value means the same thing before and after, and a dict item
assignment never resizes the dict under a reader iterating it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

from mailstate.state.aliases import links
from mailstate.state.files import format_fits
from mailstate.state.models import DomainFile

BUCKETS = 256
_MASK = BUCKETS - 1


class LazySource(Protocol):
    """Where `Lazy` entries come from (state.load's parse cache file)."""

    def load(self, entry: Lazy) -> DomainFile: ...


class Lazy:
    """A domain not parsed yet: its cache entry's place, and what the indexes need to know."""

    __slots__ = (
        "alias_of", "boxes", "domain", "fits", "home", "length", "links", "mac", "moved_from", "moving_to", "offset",
        "oid", "project_id", "replica", "source",
    )  # fmt: skip

    def __init__(
        self,
        source: LazySource,
        domain: str,
        oid: str,
        offset: int,
        length: int,
        mac: str,
        project_id: int | None,
        alias_of: str | None,
        fits: int,
        links: frozenset[str] = frozenset(),
        placement: Placement | None = None,
    ) -> None:
        self.source = source
        self.domain = domain  # the same attribute name as DomainFile's
        self.oid = oid
        self.offset = offset
        self.length = length
        self.mac = mac
        self.project_id = project_id
        self.alias_of = alias_of
        self.fits = fits  # state.files.format_fits of the domain
        self.links = links  # state.aliases.links of the domain: the domains it hands mail to
        # The placement index's fields (state.snapshot): home, moving_to, moved_from, replica, mailbox count.
        self.home, self.moving_to, self.moved_from, self.replica, self.boxes = placement or NO_PLACEMENT

    def __repr__(self) -> str:
        return f"Lazy({self.domain}, {self.oid[:12]})"


Entry = DomainFile | Lazy
# (home, moving_to, moved_from, replica, mailboxes): what the snapshot's placement index needs of a domain.
Placement = tuple[str | None, str | None, str | None, str | None, int]
NO_PLACEMENT: Placement = (None, None, None, None, 0)


def placement_of(value: Entry) -> Placement:
    """A domain's placement fields, without parsing a Lazy entry."""
    if type(value) is Lazy:
        return value.home, value.moving_to, value.moved_from, value.replica, value.boxes
    dom: DomainFile = value  # type: ignore[assignment]
    return dom.home, dom.moving_to, dom.moved_from, dom.replica, len(dom.mailboxes)


def _bucket(name: str) -> int:
    # str hashes are cached on the object and stable within a process; nothing is persisted.
    return hash(name) & _MASK


class DomainMap(Mapping[str, DomainFile]):
    """name → DomainFile, immutable; `evolve` gives the next snapshot's map."""

    __slots__ = ("_buckets", "_len")

    def __init__(self, buckets: tuple[dict[str, Entry], ...], length: int) -> None:
        self._buckets = buckets
        self._len = length

    @classmethod
    def of(cls, items: Iterable[tuple[str, Entry]] | Mapping[str, Entry]) -> DomainMap:
        """A map of `items` (name, DomainFile or Lazy); a DomainMap is returned as it is."""
        if isinstance(items, DomainMap):
            return items
        pairs = items.items() if isinstance(items, Mapping) else items
        buckets: tuple[dict[str, Entry], ...] = tuple({} for _ in range(BUCKETS))
        for name, value in pairs:
            buckets[hash(name) & _MASK][name] = value
        return cls(buckets, sum(len(b) for b in buckets))

    def __getitem__(self, name: str) -> DomainFile:
        bucket = self._buckets[hash(name) & _MASK]
        value = bucket[name]
        if type(value) is Lazy:
            value = bucket[name] = value.source.load(value)
        return value  # type: ignore[return-value]

    def get(self, name: str, default: DomainFile | None = None) -> DomainFile | None:  # type: ignore[override]
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._buckets[hash(name) & _MASK]

    def __iter__(self) -> Iterator[str]:
        for bucket in self._buckets:
            yield from list(bucket)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"DomainMap({self._len} domains, {self.parsed_count()} parsed)"

    def meta(self, name: str) -> tuple[int | None, str | None]:
        """(project_id, alias_of) of `name` without parsing it; KeyError if absent."""
        value = self._buckets[hash(name) & _MASK][name]
        return value.project_id, value.alias_of

    def placement(self, name: str) -> Placement:
        """`placement_of` the domain `name` without parsing it; KeyError if absent."""
        return placement_of(self._buckets[hash(name) & _MASK][name])

    def placement_items(self) -> Iterator[tuple[str, Placement]]:
        """(name, placement) of every domain that has a home, parsing none."""
        for bucket in self._buckets:
            for name, value in list(bucket.items()):
                if value.home is not None:
                    yield name, placement_of(value)

    def meta_items(self) -> Iterator[tuple[str, int | None, str | None]]:
        """(name, project_id, alias_of) of every domain, parsing none."""
        for bucket in self._buckets:
            for name, value in list(bucket.items()):
                yield name, value.project_id, value.alias_of

    def links_of(self, name: str) -> frozenset[str]:
        """state.aliases.links of `name` without parsing it; KeyError if absent."""
        value = self._buckets[hash(name) & _MASK][name]
        return value.links if isinstance(value, Lazy) else links(value)

    def link_items(self) -> Iterator[tuple[str, frozenset[str]]]:
        """(name, links) of every domain that hands mail to another, parsing none."""
        for bucket in self._buckets:
            for name, value in list(bucket.items()):
                found = value.links if isinstance(value, Lazy) else links(value)
                if found:
                    yield name, found

    def unfit(self, bit: int) -> list[str]:
        """Names whose `fits` (state.files.format_fits) lacks `bit`, parsing none."""
        out: list[str] = []
        for bucket in self._buckets:
            for name, value in list(bucket.items()):
                fits = value.fits if isinstance(value, Lazy) else format_fits(value)
                if not fits & bit:
                    out.append(name)
        return out

    def parsed_count(self) -> int:
        """How many values are models already (the rest are still `Lazy`)."""
        return sum(1 for bucket in self._buckets for value in list(bucket.values()) if type(value) is not Lazy)

    def evolve(self, changes: Mapping[str, DomainFile | None]) -> DomainMap:
        """The map with `changes` applied (None removes); copies only the buckets they touch."""
        buckets = list(self._buckets)
        copied: set[int] = set()
        length = self._len
        for name, new in changes.items():
            at = hash(name) & _MASK
            if at not in copied:
                buckets[at] = dict(buckets[at])
                copied.add(at)
            bucket = buckets[at]
            present = name in bucket
            if new is None:
                if present:
                    del bucket[name]
                    length -= 1
            else:
                bucket[name] = new
                length += 0 if present else 1
        return DomainMap(tuple(buckets), length)
