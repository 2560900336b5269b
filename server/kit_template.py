"""The ``client.toml`` a coordinator hands each institution in its kit."""

from __future__ import annotations


def client_toml(name: str, superlink: str) -> str:
    """Render the commented, ready-to-edit client config for institution ``name``."""
    return f'''\
# fedsilo client configuration for institution "{name}".
# Relative paths are relative to the folder holding this file (the kit folder).

institution = "{name}"

# The coordinator's SuperLink and the CA that signed its TLS certificate.
superlink = "{superlink}"
root-certificates = "ca.pem"

# This institution's node-authentication key (OpenSSH, ECDSA P-384). Keep it secret;
# the coordinator has registered its public half (node.pub).
auth-private-key = "node.key"

# ---- Local data: EDIT ----------------------------------------------------------------
# A .csv, .jsonl or .parquet file. It is read here and never leaves this machine.
data = "data/train.csv"
text-column = "text"
label-column = "label"

# ---- Local privacy policy: EDIT ------------------------------------------------------
# These are this institution's OWN limits for record-level DP-SGD, decided here and not
# by the coordinator: the privacy budget of each dataset (across all runs, kept in the
# ledger below) and the per-example clipping.
target-epsilon = 8.0
# 0 = automatic: min(1e-5, 0.1 / number of local training examples).
target-delta = 0.0
max-grad-norm = 1.0
# Where this institution's privacy ledger lives (ε spent per dataset). Back it up;
# `flower-client --config client.toml --ledger` prints it.
ledger-dir = "ledger"

# ---- De-identification (on by default) -----------------------------------------------
# Identifiers in every text become [EMAIL], [PHONE], [URL], [IP], [DATE], [CARD], [SSN],
# [ID] before anything tokenises or caches it (docs/privacy.md, section 7). kinds = []
# turns it off; a run whose deidentify-floor asks for kinds not listed is declined.
[deidentify]
kinds = ["email", "phone", "url", "ip", "date", "card", "ssn", "id"]
# Your own identifiers, each replaced by [NAME]:
# patterns = [{{ name = "badge", regex = 'BADGE-\\d{{5}}' }}]
# Person names need a local spaCy NER model folder (nothing is downloaded); then add
# "person" to kinds:
# ner-model = "models/my-spacy-ner"
'''
