"""De-identification: recall per kind on planted identifiers, clean text unchanged, patterns."""

import json
import re
import socket
from collections import Counter

import pytest
from make_identifiers import KINDS, clean_notes, planted_notes

from fedsilo.common.config import ConfigError, FedsiloConfig
from fedsilo.common.deidentify import (
    PATTERN_KINDS,
    DeidSettings,
    Report,
    Scrubber,
    placeholder,
    scrubber_for,
)
from fedsilo.common.records import TextRecords

#: Per kind: the share of planted values that must be gone, replaced by their placeholder.
RECALL = 0.99


def leaked(value: str, text: str) -> bool:
    """Whether ``value``, or a digit-bearing piece of it of 4+ characters, is in ``text``."""
    if value.lower() in text.lower():
        return True
    pieces = re.findall(r"[A-Za-z0-9]+", value)
    return any(len(p) >= 4 and any(c.isdigit() for c in p) and p in text for p in pieces)


@pytest.fixture(scope="module")
def scrubbed():
    notes = planted_notes(per_kind=200, seed=29)
    scrubber = scrubber_for(DeidSettings())
    return [(note, *scrubber.scrub(note.text)) for note in notes]


def test_the_generator_plants_hundreds_of_every_kind_in_varied_formats(scrubbed):
    planted = Counter(kind for note, _, _ in scrubbed for kind, _ in note.planted)
    assert set(planted) == set(KINDS) == set(PATTERN_KINDS)
    assert all(n >= 200 for n in planted.values())
    shapes = {kind: {re.sub(r"[0-9]", "9", re.sub(r"[a-z]", "a", v.lower()))
                     for note, _, _ in scrubbed for k, v in note.planted if k == kind}
              for kind in KINDS}
    assert all(len(s) >= 3 for s in shapes.values()), {k: len(s) for k, s in shapes.items()}


def test_recall_per_kind_and_each_value_becomes_its_typed_placeholder(scrubbed):
    found, typed, total = Counter(), Counter(), Counter()
    for note, text, counts in scrubbed:
        for kind, value in note.planted:
            total[kind] += 1
            found[kind] += not leaked(value, text)
            typed[kind] += placeholder(kind) in text and counts[kind] > 0
    for kind in KINDS:
        assert found[kind] / total[kind] >= RECALL, (kind, found[kind], total[kind])
        assert typed[kind] / total[kind] >= RECALL, (kind, typed[kind], total[kind])


def test_text_without_identifiers_comes_back_byte_for_byte():
    scrubber = scrubber_for(DeidSettings())
    odd = ["  Naïve   patient,\ttwo spaces \r\n", "Ünïcödé — “quotes” ½ dose", "x"]
    for text in clean_notes() + odd:
        out, counts = scrubber.scrub(text)
        assert out == text and out.encode() == text.encode() and not counts


def test_off_changes_nothing_and_loads_no_analyzer():
    scrubber = Scrubber(DeidSettings(kinds=()))
    text = "call 212-555-0143 or mail a.b@example.org"
    assert scrubber.scrub(text) == (text, Counter())
    assert "_engines" not in vars(scrubber)  # Presidio never built


def test_only_the_chosen_kinds_are_replaced():
    scrubber = Scrubber(DeidSettings(kinds=("email",)))
    out, counts = scrubber.scrub("mail a.b@example.org, call (212) 555-0143")
    assert out == "mail [EMAIL], call (212) 555-0143" and counts == Counter(email=1)


def test_an_institutions_own_pattern_is_replaced_by_its_name():
    settings = DeidSettings.model_validate(
        {"kinds": ["email"], "patterns": [{"name": "badge", "regex": r"BADGE-\d{5}"}]})
    out, counts = Scrubber(settings).scrub("Badge BADGE-48213 scanned, mail x@example.org")
    assert out == "Badge [BADGE] scanned, mail [EMAIL]"
    assert counts == Counter(badge=1, email=1)
    assert Scrubber(settings).scrub("badge-48213")[1] == Counter()  # case-sensitive as written


@pytest.mark.parametrize(("table", "needle"), [
    ({"kinds": ["emails"]}, "kinds"),
    ({"patterns": [{"name": "badge", "regex": "BADGE-(\\d"}]}, "not a valid regular expression"),
    ({"patterns": [{"name": "badge", "regex": "x*"}]}, "matches the empty text"),
    ({"patterns": [{"name": "email", "regex": "E\\d+"}]}, "built-in kind"),
    ({"kinds": ["email", "person"]}, "needs ner-model"),
    ({"ner-model": "/nonexistent/model"}, "not a folder"),
    ({"kinds": ["email"], "level": 3}, "level"),
])
def test_bad_settings_name_the_key(table, needle):
    with pytest.raises(ValueError, match=needle):
        DeidSettings.model_validate(table)


def test_no_network_is_attempted(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    scrubber = Scrubber(DeidSettings())  # a new one: nothing built before the guard
    for note in planted_notes(per_kind=3, seed=5):
        scrubber.scrub(note.text)
    assert attempts == []


def test_person_names_need_a_local_ner_model(tmp_path):
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")  # a local pipeline whose entity ruler stands in for an NER model
    nlp.add_pipe("entity_ruler").add_patterns(
        [{"label": "PERSON", "pattern": [{"LOWER": "maria"}, {"LOWER": "garcia"}]}])
    nlp.to_disk(tmp_path / "ner")
    text = "Maria Garcia called from 212-555-0143."
    assert Scrubber(DeidSettings()).scrub(text)[0] == "Maria Garcia called from [PHONE]."
    with_names = DeidSettings(kinds=(*PATTERN_KINDS, "person"), ner_model=str(tmp_path / "ner"))
    out, counts = Scrubber(with_names).scrub(text)
    assert out == "[PERSON] called from [PHONE]." and counts == Counter(person=1, phone=1)


def test_report_counts_per_file_and_kind_and_never_values(tmp_path):
    notes = planted_notes(per_kind=5, seed=3)
    records = TextRecords([n.text for n in notes], ["a"] * len(notes), {}, "notes.csv")
    report = Report()
    scrubber = Scrubber(DeidSettings())
    clean = scrubber.scrub_records(records, tmp_path, report)
    doc = report.as_dict()["notes.csv"]
    assert doc["texts"] == len(notes) == doc["changed"]
    assert doc["counts"] == {k: 5 for k in sorted(KINDS)}
    shown = json.dumps(report.as_dict()) + "\n".join(report.lines())
    cached = "".join(p.read_text() for p in tmp_path.iterdir())
    for note in notes:
        for _, value in note.planted:
            assert not leaked(value, shown) and not leaked(value, cached)
            assert not any(leaked(value, t) for t in clean.texts)
    again, fresh = Report(), Scrubber(DeidSettings())  # a later process reads the cache
    assert fresh.scrub_records(records, tmp_path, again).texts == clean.texts
    assert again.as_dict() == report.as_dict() and "_engines" not in vars(fresh)
    for path in tmp_path.glob("deid-*.json"):  # a damaged cache is scrubbed again, not trusted
        path.write_text("[1, 2]")
    assert scrubber.scrub_records(records, tmp_path, Report()).texts == clean.texts


def test_the_floor_is_a_run_config_key_of_known_kinds():
    cfg = FedsiloConfig.from_flat({"deidentify-floor": "email, phone"})
    assert cfg.privacy.deidentify_floor == ("email", "phone")
    assert FedsiloConfig.from_flat(cfg.to_flat()) == cfg
    assert FedsiloConfig.from_flat({"deidentify-floor": "all"}).privacy.deidentify_floor \
        == PATTERN_KINDS
    with pytest.raises(ConfigError, match="'deidentify-floor'.*unknown kind.*'emial'"):
        FedsiloConfig.from_flat({"deidentify-floor": "emial"})


def test_the_simulation_flag_makes_every_institution_scrub_every_pattern_kind():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "simulations" / "run_simulation.py"
    spec = importlib.util.spec_from_file_location("run_simulation_deid", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)

    def floor(*argv):
        return sim.resolve_config(sim.build_parser().parse_args(argv)).privacy.deidentify_floor

    assert floor() == ()
    assert floor("--deidentify") == PATTERN_KINDS
    assert floor("--deidentify", "--deidentify-floor", "email,ip") == ("email", "ip")
