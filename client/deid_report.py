"""``flower-client``'s de-identification parts: the ``[deidentify]`` table, report and preview.

What the scrubber replaced is reported as counts per kind and file, on the
institution's terminal and in its journal; the preview prints scrubbed texts on the
terminal only. Neither ever leaves the institution (see :mod:`fedsilo.common.deidentify`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedsilo.client.settings import DEID_KEY, LEDGER_KEY, NAME_KEY
from fedsilo.common import journal
from fedsilo.common.deidentify import DeidentifyError, DeidSettings, Report, scrubber_for
from fedsilo.common.records import TextRecords, load_records

log = logging.getLogger("fedsilo.client")


def deid_settings(table: object, path: Path) -> DeidSettings:
    """The ``[deidentify]`` table of ``path`` (client.toml); ``ner-model`` is relative to it.

    Raises
    ------
    DeidentifyError
        For a value that is not a table, an unknown key or kind, or a bad pattern; the
        message names the file and the key.
    """
    if not isinstance(table, dict):
        raise DeidentifyError(f"{path}: 'deidentify' must be a table ([deidentify] with kinds, "
                              "patterns, ner-model)")
    if table.get("ner-model") and not Path(str(table["ner-model"])).is_absolute():
        table = {**table, "ner-model": str((path.parent / str(table["ner-model"])).resolve())}
    try:
        return DeidSettings.model_validate(table)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'table'}: {e['msg']}"
                             for e in err.errors(include_url=False, include_input=False))
        raise DeidentifyError(f"{path}: invalid [deidentify] table: {problems}") from None


def deidentify_check(settings: dict[str, Any]) -> Report:
    """Scrub the data as training will; log counts per kind and file and journal them locally."""
    records = _records(settings)
    deid: DeidSettings = settings[DEID_KEY]
    if not deid.active:
        log.warning("de-identification is OFF ([deidentify] kinds = []): identifiers in the "
                    "texts reach the tokenizer, the caches and the model")
    report = Report()
    scrubber_for(deid).scrub_records(records, Path(settings[LEDGER_KEY]) / "token-cache", report)
    for line in report.lines():
        log.info("de-identification (%s): %s", ", ".join(deid.kinds) or "off", line)
    journal.append(Path(settings[LEDGER_KEY]) / "journal.jsonl", "deidentify-check",
                   institution=settings[NAME_KEY], kinds=list(deid.kinds),
                   patterns=[p.name for p in deid.patterns], files=report.as_dict())
    return report


def deid_preview(settings: dict[str, Any], count: int) -> list[str]:
    """Print ``count`` scrubbed texts (changed ones first) on this terminal; return them."""
    records = _records(settings)
    scrubber = scrubber_for(settings[DEID_KEY])
    shown: list[str] = []
    for changed_only in (True, False):
        for text in records.texts:
            if len(shown) >= count:
                break
            clean, found = scrubber.scrub(text)
            if bool(found) == changed_only:
                print(f"--- {', '.join(sorted(found)) or 'unchanged'}\n{clean}")
                shown.append(clean)
    return shown


def _records(settings: dict[str, Any]) -> TextRecords:
    return load_records(settings["data"], settings.get("text-column", "text"),
                        settings.get("label-column", "label"))
