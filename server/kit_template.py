"""The ``client.toml`` a coordinator hands each institution in its kit."""

from __future__ import annotations


def client_toml(name: str, superlink: str, ca_sha256: str, institution_key: bool = True) -> str:
    """Render the commented, ready-to-edit client config for institution ``name``.

    ``institution_key`` says whether the institution made its node key itself
    (``flower-client keygen``) or the coordinator made it (the old flow).
    """
    key = ('# This institution\'s node-authentication key, made here by `flower-client keygen`\n'
           '# (OpenSSH, ECDSA P-384). It never leaves this institution; the coordinator\n'
           '# registered only its public half.\n') if institution_key else (
           '# This institution\'s node-authentication key (OpenSSH, ECDSA P-384). The\n'
           '# COORDINATOR GENERATED IT (--generate-keys-at-coordinator) and could impersonate\n'
           '# this institution with its copy; prefer `flower-client keygen` and ask to be\n'
           '# re-provisioned with your own public key.\n')
    return f'''\
# fedsilo client configuration for institution "{name}".
# Relative paths are relative to the folder holding this file (the institution's folder:
# put it beside node.key and ca.pem).

institution = "{name}"

# The coordinator's SuperLink and the CA that signed its TLS certificate. flower-client
# refuses a ca.pem whose SHA-256 fingerprint is not ca-sha256; compare this value with
# the one the coordinator told you by another channel (phone, in person).
superlink = "{superlink}"
root-certificates = "ca.pem"
ca-sha256 = "{ca_sha256}"

{key}auth-private-key = "node.key"

# ---- Local data: EDIT ----------------------------------------------------------------
# A .csv, .jsonl or .parquet file. It is read here and never leaves this machine.
data = "data/train.csv"
text-column = "text"
label-column = "label"

# ---- Local privacy policy: EDIT ------------------------------------------------------
# These are this institution's OWN limits for record-level DP-SGD, decided here and not
# by the coordinator: the most ε one run may spend (a run agreed at more joins at this),
# the lifetime ε of each dataset across all runs (kept in the ledger below; a run it
# cannot pay is declined before any step) and the per-example clipping.
target-epsilon = 8.0
lifetime-epsilon = 10.0
# 0 = automatic: min(1e-5, 0.1 / number of local training examples).
target-delta = 0.0
max-grad-norm = 1.0
# Where this institution's privacy ledger and its approved agreements live. Back it up;
# `flower-client ledger show --config client.toml` prints ε spent / lifetime / left.
ledger-dir = "ledger"
# The record count this institution releases. Unset, each train reply carries the exact
# size of the training split (num-examples, and the sample rate, sigma, steps and automatic
# delta that follow from it). Set it, e.g. rounded to the hundred, and every one of them
# follows the declared count instead; give the coordinator the same number
# (`flower-server provision --expected-examples N`). Privacy does not depend on it.
# declared-examples = 1000
# How this institution splits its data (its own; the coordinator cannot change it):
# seed = 42
# test-fraction = 0.1
# max-examples = 0

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
