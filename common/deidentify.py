"""De-identification at the institution: identifiers in texts become typed placeholders.

Every text an institution loads is scrubbed before it is tokenised, cached or
evaluated: e-mail addresses, phone and fax numbers, URLs, IP addresses, dates, payment
cards, US social-security numbers and ID-like numbers (medical record, account, patient
and policy numbers, IBANs) are each replaced by a placeholder naming the kind
(``[EMAIL]``, ``[PHONE]``, ``[URL]``, ``[IP]``, ``[DATE]``, ``[CARD]``, ``[SSN]``,
``[ID]``), so the model still learns that something of that kind was there.
Institution-defined patterns add kinds of their own (``[BADGE]`` for a pattern named
``badge``).

Detection is Microsoft Presidio's analyzer (its pattern recognizers; the phone
recognizer is Google's libphonenumber; cards are Luhn-checked, SSNs and IBANs
validated), run with Presidio's no-op NLP engine, so it needs no language model and
never downloads one; replacement is Presidio's anonymizer. Person names need a named-
entity model: they are removed only when the institution names a local spaCy model
folder (``ner-model``); no model is fetched, ever. A text in which nothing is found comes
back unchanged, byte for byte.

The scrubber reports what it replaced as counts per kind (never the values).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

import regex
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from fedsilo.common import deid_recognizers
from fedsilo.common.atomic import write_json_atomic
from fedsilo.common.deid_recognizers import PERSON, entity_kind
from fedsilo.common.records import TextRecords

log = logging.getLogger(__name__)

#: Kinds found by patterns alone, in the order reports list them.
PATTERN_KINDS = ("email", "phone", "url", "ip", "date", "card", "ssn", "id")
Kind = Literal["email", "phone", "url", "ip", "date", "card", "ssn", "id", "person"]
ALL_KINDS: tuple[str, ...] = (*PATTERN_KINDS, PERSON)

class DeidentifyError(ValueError):
    """The de-identification settings are unusable; the message names the key and the fix."""


def placeholder(kind: str) -> str:
    """The text that replaces an identifier of ``kind``: ``[EMAIL]``, ``[BADGE]``."""
    return f"[{kind.upper()}]"


class CustomPattern(BaseModel):
    """An institution's own identifier: a name (its placeholder) and a regular expression."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$", description="lower-case name; "
                      "matches become [NAME]")
    regex: str = Field(min_length=1, description="a Python `regex` expression (case-"
                       "sensitive unless it starts with (?i))")

    @field_validator("name")
    @classmethod
    def _not_builtin(cls, name: str) -> str:
        if name in ALL_KINDS:
            raise ValueError(f"'{name}' is a built-in kind; name the pattern differently")
        return name

    @field_validator("regex")
    @classmethod
    def _compiles(cls, expression: str) -> str:
        try:
            compiled = regex.compile(expression)
        except regex.error as err:
            raise ValueError(f"not a valid regular expression ({err})") from None
        if compiled.search(""):
            raise ValueError("the expression matches the empty text; it must match something")
        return expression


class DeidSettings(BaseModel):
    """What an institution scrubs (the ``[deidentify]`` table of its client.toml).

    The default scrubs every pattern kind; ``kinds = []`` turns scrubbing off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              alias_generator=lambda name: name.replace("_", "-"))

    kinds: tuple[Kind, ...] = Field(PATTERN_KINDS, description="identifier kinds replaced")
    patterns: tuple[CustomPattern, ...] = Field(
        (), description="the institution's own identifiers, each {name, regex}")
    ner_model: str = Field("", description="local spaCy model folder that finds person names "
                           "(needed for kind 'person'); nothing is downloaded")

    @model_validator(mode="after")
    def _consistent(self) -> DeidSettings:
        if PERSON in self.kinds and not self.ner_model:
            raise ValueError("kind 'person' needs ner-model, a local spaCy model folder "
                             "(names cannot be found by patterns)")
        if self.ner_model and not Path(self.ner_model).is_dir():
            raise ValueError(f"ner-model {self.ner_model!r} is not a folder; point it to a "
                             "local spaCy model (nothing is downloaded)")
        names = [p.name for p in self.patterns]
        if len(set(names)) != len(names):
            raise ValueError(f"pattern names must be unique (got {names})")
        return self

    @field_validator("kinds")
    @classmethod
    def _unique(cls, kinds: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(kinds))

    @property
    def active(self) -> bool:
        """Whether anything is scrubbed."""
        return bool(self.kinds or self.patterns)

    def missing(self, floor: Iterable[str]) -> list[str]:
        """The kinds of ``floor`` this institution does not scrub."""
        return [kind for kind in floor if kind not in self.kinds]

    def to_node(self) -> str:
        """These settings as one node-config value (base64 JSON: Flower's parser splits quotes)."""
        return base64.urlsafe_b64encode(self.model_dump_json(by_alias=True).encode()).decode()

    @classmethod
    def from_node(cls, value: str) -> DeidSettings:
        """Settings written by :meth:`to_node`."""
        return cls.model_validate_json(base64.urlsafe_b64decode(value.encode()))


def parse_kinds(value: object, origin: str) -> tuple[str, ...]:
    """Kinds from a JSON list, a comma-separated text or ``all``; checked against the known ones.

    Raises
    ------
    DeidentifyError
        For an unknown kind; the message names ``origin`` and the known kinds.
    """
    if isinstance(value, str):
        text = value.strip()
        if text == "all":
            return PATTERN_KINDS
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise DeidentifyError(f"{origin}: not a JSON list ({err})") from None
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(k, str) for k in value):
        raise DeidentifyError(f"{origin}: expected a list of kinds, got {value!r:.60}")
    unknown = [k for k in value if k not in ALL_KINDS]
    if unknown:
        raise DeidentifyError(f"{origin}: unknown kind(s) {unknown}; known kinds: "
                              f"{', '.join(ALL_KINDS)}")
    return tuple(dict.fromkeys(value))


#: Kinds, also read from a JSON list, a comma-separated text or ``all`` (run config, flags).
KindList = Annotated[tuple[Kind, ...], BeforeValidator(
    lambda value: parse_kinds(value, "kinds") if isinstance(value, str) else value)]


@dataclass
class Report:
    """What a scrub replaced, per file: texts seen, texts changed, counts per kind.

    Never holds a replaced value.
    """

    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, source: str, texts: int, changed: int, counts: Mapping[str, int]) -> None:
        """Add ``texts`` texts of ``source``, ``changed`` of them changed, and their counts."""
        entry = self.files.setdefault(source, {"texts": 0, "changed": 0, "counts": Counter()})
        entry["texts"] += texts
        entry["changed"] += changed
        entry["counts"].update(counts)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-ready: ``{file: {"texts": n, "changed": n, "counts": {kind: n}}}``."""
        return {source: {**entry, "counts": dict(sorted(entry["counts"].items()))}
                for source, entry in self.files.items()}

    def lines(self) -> list[str]:
        """One human-readable line per file: texts changed and counts per kind."""
        out = []
        for source, doc in self.as_dict().items():
            counts = ", ".join(f"{k} {n}" for k, n in doc["counts"].items()) or "nothing found"
            out.append(f"{source}: {doc['changed']} of {doc['texts']} texts changed ({counts})")
        return out


class Scrubber:
    """Replaces identifiers in texts by typed placeholders (see the module docstring)."""

    def __init__(self, settings: DeidSettings) -> None:
        self.settings = settings

    @functools.cached_property
    def _engines(self) -> tuple[Any, list[str], Any]:
        """Presidio's analyzer, its entities and the anonymizer, built on first use only.

        A process whose texts all come from the cache never imports Presidio.
        """
        from presidio_anonymizer import AnonymizerEngine

        settings = self.settings
        return (*deid_recognizers.analyzer(
            settings.kinds, [(p.name, p.regex) for p in settings.patterns],
            settings.ner_model), AnonymizerEngine())

    def scrub(self, text: str) -> tuple[str, Counter[str]]:
        """Return ``text`` with identifiers replaced, and the count of each kind replaced."""
        if not self.settings.active:
            return text, Counter()
        analyzer, entities, anonymizer = self._engines
        found = analyzer.analyze(text, language="en", entities=entities, score_threshold=0.0)
        if not found:
            return text, Counter()
        for r in found:  # libphonenumber keeps an opening "(" the number does not close
            if text[r.start] == "(" and ")" not in text[r.start:r.end]:
                r.start += 1
        from presidio_anonymizer.entities import ConflictResolutionStrategy, OperatorConfig

        kinds = {r.entity_type: entity_kind(r.entity_type) for r in found}
        operators = {e: OperatorConfig("replace", {"new_value": placeholder(k)})
                     for e, k in kinds.items()}
        result = anonymizer.anonymize(
            text, found, operators,
            conflict_resolution=ConflictResolutionStrategy.REMOVE_INTERSECTIONS)
        return result.text, Counter(kinds[item.entity_type] for item in result.items)

    @functools.cached_property
    def key(self) -> str:
        """SHA-256 of what decides the output: settings, this code and Presidio's version."""
        digest = hashlib.sha256(self.settings.model_dump_json().encode("utf-8"))
        digest.update(Path(__file__).read_bytes())
        digest.update(Path(deid_recognizers.__file__).read_bytes())
        for package in ("presidio-analyzer", "presidio-anonymizer", "phonenumbers"):
            digest.update(f"{package}={metadata.version(package)}".encode())
        return digest.hexdigest()

    def scrub_records(self, records: TextRecords, folder: Path | None,
                      report: Report) -> TextRecords:
        """``records`` with every text scrubbed; counts are added to ``report``.

        The result is cached in ``folder`` (the institution's own disk), keyed by the raw
        texts and :attr:`key`, so a new process of the same run does not scrub again.
        """
        if not self.settings.active:
            report.add(records.source, len(records), 0, {})
            return records
        path = None
        if folder is not None:
            digest = hashlib.sha256(self.key.encode("utf-8"))
            for text in records.texts:
                digest.update(json.dumps(text).encode("utf-8"))
            path = folder / f"deid-{digest.hexdigest()[:40]}.json"
        doc = _load_json(path)
        if doc is None or len(doc["texts"]) != len(records):
            counts: Counter[str] = Counter()
            texts = []
            for text in records.texts:
                clean, found = self.scrub(text)
                texts.append(clean)
                counts.update(found)
            changed = sum(a != b for a, b in zip(texts, records.texts, strict=True))
            doc = {"texts": texts, "changed": changed, "counts": dict(counts)}
            if path is not None:
                write_json_atomic(path, doc, indent=None)
        report.add(records.source, len(records), doc["changed"], doc["counts"])
        return dataclasses.replace(records, texts=list(doc["texts"]))


@functools.lru_cache(maxsize=4)
def scrubber_for(settings: DeidSettings) -> Scrubber:
    """The :class:`Scrubber` for ``settings``, built once per process (compiling takes seconds)."""
    return Scrubber(settings)


def _load_json(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as err:
        doc = err
    if isinstance(doc, dict) and {"texts", "changed", "counts"} <= doc.keys():
        return doc
    log.warning("de-identification cache %s is unreadable (%s); scrubbing again", path,
                doc if isinstance(doc, Exception) else "not a cache file")
    return None
