"""The one personal-data detector (opengemma.data.pii), shared by the data pipeline and the
memorization evaluation: kinds and severities, validity checks, redaction, per-severity policy,
and recall/precision floors on Presidio's synthetic gold spans (bench/pii_presidio.py records
the full table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opengemma.data import pii
from opengemma.errors import OpenGemmaError

PRESIDIO = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "pii_presidio_synth" / "synth_dataset_v2.jsonl"


def test_kinds_and_severities():
    assert pii.luhn_valid("4111111111111111") and not pii.luhn_valid("4111111111111112")
    found = {f.kind: f.severity for f in pii.scan(
        "card 4111 1111 1111 1111, ssn 123-45-6789, mail a.b@example.com, call +1 415 555 0100, "
        "at 221 Baker Street, iban GB82 WEST 1234 5698 7654 32, host 10.0.0.1, v6 2001:db8::8a2e:370:7334")}
    assert found == {"credit_card": "sensitive", "ssn": "sensitive", "email": "personal", "phone": "personal",
                     "address": "personal", "iban": "sensitive", "ip": "personal"}
    counts = pii.severity_counts(["nothing here", "mail x@y.org", "ssn 123-45-6789 and x@y.org"])
    assert (counts["sensitive"], counts["personal"]) == (1, 1)


@pytest.mark.parametrize("text", [
    "Betty needs 100 - 50 - 30 - 15 = $5 more; 6000-2000 = 4000",  # arithmetic, not phones
    "He served in WWII 1943-1945 and in the 2015-2016 school year.",  # ranges of years
    "see http://vimeo.com/107582646 and section 99-35-115",  # bare 9 digits, statute numbers
    "EPA 27 MPG Hwy/20 MPG City",  # all-capital words are not a street name
])
def test_no_false_positives_on_number_shapes(text):
    assert pii.scan(text) == []


def test_validity_checks():
    assert not [f for f in pii.scan("order 4111 1111 1111 1112 and 000-12-3456") if f.severity == "sensitive"]


def test_iban_wins_over_a_luhn_valid_tail():
    assert [f.kind for f in pii.scan("account GB37LTXZ84215830989318 today")] == ["iban"]


def test_redaction_and_policy():
    text = "Write to jane@example.org or call (415) 555-0100; card 4111-1111-1111-1111."
    assert pii.redact(text, pii.scan(text)) == "Write to [EMAIL] or call [PHONE]; card [CREDIT_CARD]."
    policy = pii.check_policy({"sensitive": "drop", "personal": "redact"})
    assert pii.apply_policy(text, policy)[0] is None
    kept, findings = pii.apply_policy("mail jane@example.org", policy)
    assert kept == "mail [EMAIL]" and [f.kind for f in findings] == ["email"]
    assert pii.apply_policy("mail jane@example.org", pii.check_policy({"personal": "keep"}))[0] == "mail jane@example.org"
    assert pii.apply_policy("ssn 123-45-6789", pii.check_policy({}))[0] == "ssn [SSN]"  # default: redact


@pytest.mark.parametrize("policy, message", [
    ({"sensitive": "keep"}, "never reach the shards"),
    ({"personal": "mask"}, "unknown action 'mask'"),
    ({"secret": "drop"}, "unknown severity 'secret'"),
])
def test_bad_policy_is_one_line(policy, message):
    with pytest.raises(OpenGemmaError, match=message):
        pii.check_policy(policy)


def test_memorization_scan_uses_this_detector():
    from opengemma.eval import memorization

    assert memorization.pii is pii
    with pytest.raises(ImportError):
        __import__("opengemma.eval.pii")


@pytest.mark.skipif(not PRESIDIO.is_file(), reason="needs ../shared/datasets/pii_presidio_synth")
def test_recall_and_precision_on_presidio_gold_spans():
    gold_map = {"CREDIT_CARD": "credit_card", "US_SSN": "ssn", "IBAN_CODE": "iban", "EMAIL_ADDRESS": "email",
                "IP_ADDRESS": "ip", "PHONE_NUMBER": "phone"}
    hit, total, tp, pred = {}, {}, {}, {}
    for line in PRESIDIO.open(encoding="utf-8"):
        rec = json.loads(line)
        found = pii.scan(rec["full_text"])
        gold = [(gold_map[s["entity_type"]], s["start_position"], s["end_position"])
                for s in rec["spans"] if s["entity_type"] in gold_map]
        for kind, a, b in gold:
            total[kind] = total.get(kind, 0) + 1
            hit[kind] = hit.get(kind, 0) + any(f.kind == kind and f.start < b and a < f.end for f in found)
        for f in found:
            pred[f.kind] = pred.get(f.kind, 0) + 1
            tp[f.kind] = tp.get(f.kind, 0) + any(k == f.kind and f.start < b and a < f.end for k, a, b in gold)
    for kind in ("credit_card", "ssn", "iban", "email", "ip"):  # sensitive kinds and exact formats: near perfect
        assert hit[kind] / total[kind] >= 0.95, kind
        assert tp[kind] / pred[kind] >= 0.95, kind
    assert hit["phone"] / total["phone"] >= 0.6 and tp["phone"] / pred["phone"] >= 0.9
