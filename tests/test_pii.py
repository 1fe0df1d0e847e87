"""PII detection: each kind is found, checksums reject look-alikes, redaction uses placeholders."""

from __future__ import annotations

import pytest

from finetune_trainer import pii


def kinds(text: str) -> list[str]:
    return [f.kind for f in pii.find(text)]


@pytest.mark.parametrize("text, kind, value", [
    ("write to jane.doe+billing@mail.example.co.uk today", "email", "jane.doe+billing@mail.example.co.uk"),
    ("call 555-123-4567 after six", "phone", "555-123-4567"),
    ("call (415) 555-0132 after six", "phone", "(415) 555-0132"),
    ("call +1 415.555.0132 after six", "phone", "+1 415.555.0132"),
    ("call +44 20 7946 0958 after six", "phone", "+44 20 7946 0958"),
    ("pay with 4111 1111 1111 1111 please", "card", "4111 1111 1111 1111"),
    ("pay with 5500-0000-0000-0004 please", "card", "5500-0000-0000-0004"),
    ("pay with 378282246310005 please", "card", "378282246310005"),
    ("my ssn is 123-45-6789.", "ssn", "123-45-6789"),
    ("iban GB82 WEST 1234 5698 7654 32 THEN done", "iban", "GB82 WEST 1234 5698 7654 32"),
    ("iban DE89370400440532013000 done", "iban", "DE89370400440532013000"),
    ("she lives at 221B Baker Street, London", "address", "221B Baker Street"),
    ("ship to 1600 Pennsylvania Ave. please", "address", "1600 Pennsylvania Ave."),
])
def test_each_kind_is_found_with_its_exact_span(text, kind, value):
    found = pii.find(text)
    assert [(f.kind, text[f.start:f.end]) for f in found] == [(kind, value)]


@pytest.mark.parametrize("text", [
    "order 1234567890123 shipped on 2024-01-15",  # order number, ISO date
    "invoice 4111 1111 1111 1112 is overdue",  # Visa prefix but Luhn fails
    "reference 1234 5678 9012 3456",  # Luhn fails and no issuer
    "release 1.2.3 at 10:30 on 12/05/2024",  # versions, times, dates
    "timestamp 20240115123000 and id 5551234567",  # bare digit runs are not phones
    "ssn-like 000-12-3456 and 666-12-3456 and 123-00-4567",  # impossible SSNs
    "account GB00 WEST 1234 5698 7654 32",  # IBAN with a wrong checksum
    "the user@localhost account",  # no TLD
    "it took 3 Days Later",  # number and words but no street type
    "ISBN 978-3-16-148410-0",
])
def test_true_negatives(text):
    assert pii.find(text) == []


def test_luhn_and_iban_checksums():
    assert pii.luhn_valid("79927398713")
    assert not pii.luhn_valid("79927398710")
    assert pii.iban_valid("FR1420041010050500013M02606")
    assert not pii.iban_valid("FR1420041010050500013M02607")


def test_overlapping_matches_count_once():
    # A card number also looks like digit groups; it is reported once, as a card.
    assert kinds("4111-1111-1111-1111") == ["card"]


def test_redact_replaces_every_finding_and_keeps_the_rest():
    text = "Mail a@b.io or call 555-123-4567; card 4111111111111111."
    assert pii.redact(text) == "Mail [EMAIL] or call [PHONE]; card [CARD]."
    assert pii.find(pii.redact(text)) == []


def test_finds_several_kinds_in_order():
    text = "SSN 123-45-6789, mail x@y.org, 10 Downing St"
    assert kinds(text) == ["ssn", "email", "address"]
