"""PII scrubbing: typed placeholders and counts, and no false positives on literature's numbers."""

import pytest

from llmpipe.data.accounting import Record
from llmpipe.data.pii import PIIConfig, ScrubPII, scrub_pii


@pytest.mark.parametrize("text, expected, kind", [
    ("Write to john.doe+plays@example.co.uk today.", "Write to <EMAIL> today.", "email"),
    ("The server at 192.168.10.254 answered.", "The server at <IP_ADDRESS> answered.", "ip_address"),
    ("Ping fe80::1ff:fe23:4567:890a or ::1 now.", "Ping <IP_ADDRESS> or <IP_ADDRESS> now.", "ip_address"),
    ("Full form 2001:0db8:85a3:0000:0000:8a2e:0370:7334.", "Full form <IP_ADDRESS>.", "ip_address"),
    ("Call (555) 123-4567 or 555-123-4567.", "Call <PHONE> or <PHONE>.", "phone"),
    ("In London dial +44 20 7946 0958, in the US +1 555 123 4567.", "In London dial <PHONE>, in the US <PHONE>.", "phone"),
])
def test_pii_becomes_typed_placeholders(text: str, expected: str, kind: str):
    out, found = scrub_pii(text)
    assert out == expected
    assert set(found) == {kind} and found[kind] == expected.count("<")


@pytest.mark.parametrize("text", [
    "Act 1, Scene 2. Enter HAMLET.",
    "See section 1.2.3 and version 2.0.1.3 of the rules, or v1.2.3.4.",
    "Shakespeare lived 1564-1616; the Folio of 1623; in 1599 the Globe was built.",
    "John 3:16 and Genesis 1:1-3; at 10:30:45 the clock struck.",
    "HAMLET. To be, or not to be: that is the question: Whether 'tis nobler in the mind to suffer",
    "Lines 123-456 and 1.1.120; ISBN 978-0-14-044913-6; 12.05.2023 and 2023-10-05.",
    "Mix the 999.12.1.1 parts; ten thousand 10,000,000 ducats; 1599 1600 1601 1602.",
    "dead:beef:: is not an address in a sentence, and a::b is not either.",
])
def test_no_false_positives_on_references_versions_and_dates(text: str):
    assert scrub_pii(text) == (text, {})


def test_step_counts_per_type_in_stats_and_meta_without_rejecting():
    step = ScrubPII(PIIConfig())
    out = step(Record("id", "web", "Mail a@b.org or c@d.net, call 555.123.4567.", {"origin": "x"}))
    assert out.text == "Mail <EMAIL> or <EMAIL>, call <PHONE>."
    assert out.meta == {"origin": "x", "pii": {"email": 2, "phone": 1}}
    assert step.stats == {"email": 2, "ip_address": 0, "phone": 1}


def test_types_param_selects_what_is_scrubbed():
    step = ScrubPII(PIIConfig(types=["phone"]))
    assert step(Record("id", "s", "a@b.org 555-123-4567")).text == "a@b.org <PHONE>"
