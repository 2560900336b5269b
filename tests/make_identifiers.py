#!/usr/bin/env python3
"""Synthetic notes with planted identifiers of every kind fedsilo's scrubber removes.

Each note is a short clinical or banking sentence with one to three identifiers planted
in varied formats (e-mail addresses, phone and fax numbers, URLs, IPv4/IPv6 addresses,
dates, payment cards with a valid Luhn digit, US social-security numbers, medical record,
account and patient numbers, IBANs). Every planted value is recorded with its kind, so a
test can measure recall per kind and check that no value survives anywhere. Notes
without identifiers (``clean_notes``) must come back unchanged. Deterministic for a seed::

    python tests/make_identifiers.py --per-kind 300 --out notes.jsonl

(tests import :func:`planted_notes` and :func:`clean_notes` directly.)
"""

from __future__ import annotations

import argparse
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("email", "phone", "url", "ip", "date", "card", "ssn", "id")

_FIRST = ["james", "maria", "wei", "fatima", "olga", "kwame", "lucia", "arjun", "noah", "emma",
          "yuki", "omar", "sofia", "liam", "ines", "chen", "amara", "pavel", "grace", "diego"]
_LAST = ["smith", "garcia", "nguyen", "okafor", "muller", "rossi", "kowalski", "tanaka",
         "haddad", "silva", "johansson", "dubois", "patel", "kim", "obrien", "novak"]
_DOMAINS = ["example.org", "mail.example.com", "clinic-north.net", "stmarys.org.uk",
            "bank-example.co.uk", "uni-hospital.de", "health.example.fr", "labcorp-test.com",
            "cityhospital.io", "care.example.ca"]
_TLDS = ["com", "org", "net", "io", "de", "co.uk", "fr", "ca", "health", "info"]
_US_AREAS = ["201", "202", "206", "212", "213", "305", "312", "404", "415", "503", "512",
             "602", "617", "646", "702", "713", "718", "801", "917", "919"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]

_TEMPLATES = [
    "Patient seen today, follow-up requested. Contact: {0}.",
    "Referral letter received; reply to {0} with the discharge summary.",
    "Customer disputes a charge and asks us to use {0} from now on.",
    "Lab result attached ({0}); no abnormal findings.",
    "Complaint logged: caller gave {0} and {1} for the callback.",
    "Admitted with chest pain. Details on file: {0}; {1}.",
    "Transfer request noted, reference {0}, second contact {1}, see also {2}.",
    "Note: {0} confirmed at intake, {1} to be verified, {2} updated.",
    "{0} was recorded by the triage nurse.",
    "Statement query for {0} escalated to the fraud team.",
]

#: Sentences with numbers, codes and units but no identifier: must come back unchanged.
_CLEAN = [
    "Type 2 diabetes mellitus without complications.",
    "Fracture of T11-T12 vertebra, initial encounter.",
    "Blood pressure 135 over 85, pulse 72, temperature 37.2 C.",
    "Metformin 500 mg twice daily for 3 months.",
    "Stage 3 chronic kidney disease, eGFR 45.",
    "Customer asked about the fees on a savings account.",
    "Follow-up in 2 weeks; HbA1c 7.1 percent.",
    "Sprain of the C5-C6 ligament of the cervical spine.",
    "Loan of 25000 over 5 years at 4.5 percent was approved.",
    "COVID-19 vaccine, second dose given in the left arm.",
    "Acute appendicitis with localized peritonitis.",
    "The patient walked 400 m in 6 minutes without oxygen.",
    "Gestational age 38 weeks, birth weight 3.2 kg.",
    "Card payment declined twice at the pharmacy.",
    "Vitamin B12 deficiency anemia due to intrinsic factor deficiency.",
    "Hearing loss in the right ear, 40 dB at 4 kHz.",
]


@dataclass
class Note:
    """One synthetic text and the identifiers planted in it, as ``(kind, value)``."""

    text: str
    planted: list[tuple[str, str]] = field(default_factory=list)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _luhn_complete(prefix: str) -> str:
    """``prefix`` plus the check digit that makes it pass the Luhn test."""
    total = 0
    for i, ch in enumerate(reversed(prefix)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return prefix + str((10 - total % 10) % 10)


def email(rng: random.Random) -> str:
    """An e-mail address."""
    first, last, domain = rng.choice(_FIRST), rng.choice(_LAST), rng.choice(_DOMAINS)
    local = rng.choice([f"{first}.{last}", f"{first[0]}{last}",
                        f"{first}_{last}{rng.randint(1, 99)}", f"{last}.{first}+notes",
                        f"{first.upper()}.{last.capitalize()}"])
    return f"{local}@{domain}"


def phone(rng: random.Random) -> str:
    """A valid US, UK, German or French phone or fax number in a common format."""
    area, line = rng.choice(_US_AREAS), _digits(rng, 4)
    exch = f"{rng.randint(2, 9)}{_digits(rng, 2)}"
    style = rng.randrange(9)
    if style == 0:
        return f"({area}) {exch}-{line}"
    if style == 1:
        return f"{area}-{exch}-{line}"
    if style == 2:
        return f"{area}.{exch}.{line}"
    if style == 3:
        return f"+1 {area} {exch} {line}"
    if style == 4:
        return f"+1-{area}-{exch}-{line}"
    if style == 5:
        return f"+44 20 7{_digits(rng, 3)} {_digits(rng, 4)}"
    if style == 6:
        return f"020 7{_digits(rng, 3)} {_digits(rng, 4)}"
    if style == 7:
        return f"+49 30 {rng.randint(2, 9)}{_digits(rng, 7)}"
    return f"+33 1 {rng.randint(40, 49)} {_digits(rng, 2)} {_digits(rng, 2)} {_digits(rng, 2)}"


def url(rng: random.Random) -> str:
    """A web address with or without scheme, path and query."""
    host = f"{rng.choice(['portal', 'www', 'records', 'my'])}.{rng.choice(_LAST)}-" \
           f"{rng.choice(['clinic', 'bank', 'care', 'health'])}.{rng.choice(_TLDS)}"
    path = rng.choice(["", "/", f"/patients/{_digits(rng, 5)}", f"/login?user={rng.choice(_FIRST)}",
                       f"/a/b-{rng.randint(1, 9)}.html"])
    scheme = rng.choice(["https://", "http://", "", "https://"])
    if not scheme and not host.startswith("www."):
        scheme = "https://"
    return f"{scheme}{host}{path}"


def ip(rng: random.Random) -> str:
    """An IPv4 or IPv6 address."""
    if rng.random() < 0.6:
        return ".".join(str(rng.randint(1 if i == 0 else 0, 254)) for i in range(4))
    groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
    if rng.random() < 0.5:
        return ":".join(groups)
    return f"{groups[0]}:{groups[1]}::{groups[6]}:{groups[7]}"


def date(rng: random.Random) -> str:
    """A calendar date in one of ten common formats."""
    y, m, d = rng.randint(1935, 2029), rng.randint(1, 12), rng.randint(1, 28)
    month = _MONTHS[m - 1]
    return rng.choice([
        f"{y}-{m:02d}-{d:02d}", f"{m:02d}/{d:02d}/{y}", f"{d:02d}/{m:02d}/{y}",
        f"{d:02d}.{m:02d}.{y}", f"{m}/{d}/{y % 100:02d}", f"{month} {d}, {y}",
        f"{d} {month} {y}", f"{month[:3]} {d} {y}", f"{y}-{m:02d}-{d:02d}T{rng.randint(0, 23):02d}:"
        f"{rng.randint(0, 59):02d}:00Z", f"{d:02d}-{month[:3].upper()}-{y}",
    ])


def card(rng: random.Random) -> str:
    """A Visa, Mastercard or Amex number with a valid check digit, grouped or not."""
    kind = rng.randrange(3)
    if kind == 2:
        number = _luhn_complete(rng.choice(["34", "37"]) + _digits(rng, 12))
        groups = [number[:4], number[4:10], number[10:]]
    else:
        prefix = "4" if kind == 0 else str(rng.randint(51, 55))
        number = _luhn_complete(prefix + _digits(rng, 15 - len(prefix)))
        groups = [number[i:i + 4] for i in range(0, 16, 4)]
    return rng.choice([" ", "-", ""]).join(groups)


def ssn(rng: random.Random) -> str:
    """A US social-security number with valid area, group and serial parts."""
    area = rng.choice([a for a in range(1, 900) if a != 666])
    group, serial = rng.randint(1, 99), rng.randint(1, 9999)
    sep = rng.choice(["-", "-", " ", "."])
    return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"


def identifier(rng: random.Random) -> str:
    """A medical record, account, patient or policy number, often with its label."""
    style = rng.randrange(7)
    if style == 0:
        return f"MRN {_digits(rng, rng.randint(6, 10))}"
    if style == 1:
        return f"MRN: {rng.choice(string.ascii_uppercase)}{_digits(rng, 7)}"
    if style == 2:
        return f"medical record number {_digits(rng, 8)}"
    if style == 3:
        return f"account no. {_digits(rng, 3)}-{_digits(rng, 3)}-{_digits(rng, 4)}"
    if style == 4:
        return f"Patient ID: PT-{_digits(rng, 6)}"
    if style == 5:
        return f"acct #{_digits(rng, 12)}"
    return _iban(rng)


def _iban(rng: random.Random) -> str:
    """A German IBAN with valid check digits, printed in groups of four."""
    bban = _digits(rng, 18)
    numeric = int(bban + "131400")  # "DE" = 13 14, check digits 00
    iban = f"DE{98 - numeric % 97:02d}{bban}"
    return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))


_MAKERS = {"email": email, "phone": phone, "url": url, "ip": ip, "date": date, "card": card,
           "ssn": ssn, "id": identifier}


def _value_only(kind: str, planted: str) -> str:
    """The part of a planted identifier that must disappear (not its label)."""
    if kind == "id":
        for label in ("MRN: ", "MRN ", "medical record number ", "account no. ", "Patient ID: ",
                      "acct #"):
            if planted.startswith(label):
                return planted[len(label):]
    return planted


def planted_notes(per_kind: int = 300, seed: int = 29) -> list[Note]:
    """Notes holding ``per_kind`` planted values of every kind, in a shuffled mix."""
    rng = random.Random(seed)
    queue = [kind for kind in KINDS for _ in range(per_kind)]
    rng.shuffle(queue)
    notes: list[Note] = []
    while queue:
        template = rng.choice(_TEMPLATES)
        slots = template.count("{")
        kinds, queue = queue[:slots], queue[slots:]
        while len(kinds) < slots:  # the last note: fill spare slots with the same kinds
            kinds.append(kinds[-1])
        values = [_MAKERS[k](rng) for k in kinds]
        text = template.format(*values)
        notes.append(Note(text, [(k, _value_only(k, v)) for k, v in zip(kinds, values,
                                                                           strict=True)]))
    return notes


def clean_notes() -> list[str]:
    """Sentences with numbers and codes but no identifier."""
    return list(_CLEAN)


def main() -> None:
    """Write the planted notes as JSON Lines (text, label, planted)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=300)
    parser.add_argument("--seed", type=int, default=29)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with args.out.open("w", encoding="utf-8") as f:
        for i, note in enumerate(planted_notes(args.per_kind, args.seed)):
            f.write(json.dumps({"text": note.text, "label": "ab"[i % 2],
                                "planted": note.planted}) + "\n")


if __name__ == "__main__":
    main()
