"""Presidio's recognizers for de-identification: which patterns find which kind.

:mod:`fedsilo.common.deidentify` scrubs with the analyzer built here; the scrubber's
cache key covers this file too, so a changed pattern scrubs again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

#: Person names: only with a local named-entity model (``ner-model``).
PERSON = "person"

#: Presidio entity types → fedsilo kind.
ENTITY_KIND = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "URL": "url",
                "IP_ADDRESS": "ip", "DATE_TIME": "date", "CREDIT_CARD": "card",
                "US_SSN": "ssn", "IBAN_CODE": "id", "RECORD_ID": "id", "PERSON": PERSON}
CUSTOM_PREFIX = "CUSTOM_"
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
#: Dates written with month names (Presidio's own patterns are numeric).
_DATE_PATTERNS = (
    ("month day year", rf"\b{_MONTH}\s+{_DAY},?\s+(?:19|20)\d\d\b"),
    ("day month year", rf"\b{_DAY}\s+(?:of\s+)?{_MONTH},?\s+(?:19|20)\d\d\b"),
    ("month year", rf"\b{_MONTH}\s+(?:19|20)\d\d\b"),
)
_ID_LABEL = (r"(?:mrn|medical\s+record(?:\s+(?:number|no\.?|#))?|patient\s+(?:id|number|no\.?)"
             r"|account(?:\s+(?:number|no\.?|#))?|acct\.?|policy\s+(?:number|no\.?|#)"
             r"|member\s+id|case\s+(?:number|no\.?)|id)")
#: ID-like numbers: a value after an identifier label, or a long run of digits.
_ID_PATTERNS = (
    ("labelled identifier", rf"(?<=\b{_ID_LABEL}\s*[:#]?\s*)(?=[a-z-]*\d)[a-z0-9][a-z0-9-]{{3,}}\b",
     0.6),
    ("long number", r"\b[a-z]{0,3}-?\d{6,}\b", 0.3),
)
#: North American numbers shaped like a phone number, valid or not (e.g. 555-01xx).
_PHONE_SHAPE = r"(?<![\w-])(?:\+?1[-. ])?\(?[2-9]\d\d\)?[-. ]?[2-9]\d\d[-. ]\d{4}\b"


def entity_kind(entity: str) -> str:
    """The fedsilo kind of a Presidio entity type (a custom pattern's own name)."""
    return entity[len(CUSTOM_PREFIX):].lower() if entity.startswith(CUSTOM_PREFIX) \
        else ENTITY_KIND[entity]


def analyzer(kinds: Iterable[str], custom: Iterable[tuple[str, str]],
             ner_model: str | None) -> tuple[Any, list[str]]:
    """Presidio's analyzer for ``kinds`` and ``custom`` (name, regex) patterns, and its entities.

    Person names need ``ner_model``, a local spaCy folder; without one no language model
    is loaded.
    """
    logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)
    logging.getLogger("presidio-anonymizer").setLevel(logging.WARNING)
    from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        DateRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UrlRecognizer,
        UsSsnRecognizer,
    )

    class OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's e-mail patterns without its suffix-list check.

        That check (tldextract) fetches the public-suffix list over the network on first
        use, and would let an intranet domain (``@lab.hospital.local``) through.
        """

        def validate_result(self, pattern_text: str) -> None:
            return None

    def patterns(entity: str, items: Iterable[tuple[str, str, float]]) -> PatternRecognizer:
        return PatternRecognizer(supported_entity=entity, name=f"fedsilo {entity.lower()}",
                                 patterns=[Pattern(n, r, s) for n, r, s in items])

    by_kind: dict[str, list[object]] = {
        "email": [OfflineEmailRecognizer()],
        "phone": [PhoneRecognizer(), patterns("PHONE_NUMBER", [("phone shape", _PHONE_SHAPE,
                                                                0.3)])],
        "url": [UrlRecognizer()],
        "ip": [IpRecognizer()],
        "date": [DateRecognizer(), patterns("DATE_TIME", [(n, r, 0.5)
                                                          for n, r in _DATE_PATTERNS])],
        "card": [CreditCardRecognizer()],
        "ssn": [UsSsnRecognizer()],
        "id": [IbanRecognizer(), patterns("RECORD_ID", _ID_PATTERNS)],
    }
    kinds = list(kinds)
    recognizers = [r for kind in kinds if kind != PERSON for r in by_kind[kind]]
    for name, expression in custom:
        recognizers.append(PatternRecognizer(
            supported_entity=CUSTOM_PREFIX + name.upper(), name=f"custom {name}",
            patterns=[Pattern(name, expression, 1.0)], global_regex_flags=0))
    nlp_engine = _nlp_engine(ner_model)
    if PERSON in kinds:
        from presidio_analyzer.predefined_recognizers import SpacyRecognizer

        recognizers.append(SpacyRecognizer(supported_entities=["PERSON"]))
    registry = RecognizerRegistry(recognizers=recognizers, supported_languages=["en"])
    engine = AnalyzerEngine(nlp_engine=nlp_engine, registry=registry, supported_languages=["en"])
    entities = sorted({e for r in recognizers for e in r.supported_entities})
    return engine, entities


def _nlp_engine(ner_model: str | None) -> object:
    """No language model unless the institution names a local spaCy folder for names."""
    if not ner_model:
        from presidio_analyzer.nlp_engine import NoOpNlpEngine

        engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    else:
        from presidio_analyzer.nlp_engine import SpacyNlpEngine

        # An existing folder (DeidSettings checks it): Presidio downloads only a model
        # *name* that is neither an installed package nor a path.
        engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": ner_model}])
    engine.load()
    return engine

