"""Certificate checks shared by the coordinator, the institutions and agreements."""

from __future__ import annotations

import datetime as dt

from cryptography import x509


def outside_validity(cert: x509.Certificate) -> str | None:
    """Say when ``cert`` is valid if that is not now (``"valid only from … to …"``), else None."""
    now = dt.datetime.now(dt.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if start <= now <= end:
        return None
    stamp = "%Y-%m-%d %H:%M"
    return f"valid only from {start:{stamp}} to {end:{stamp}} UTC (now {now:{stamp}})"
