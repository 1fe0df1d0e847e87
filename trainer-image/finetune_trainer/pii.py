"""Fast, dependency-free PII detection for dataset validation.

Each kind is a regular expression that finds candidates plus, where one exists, a
checksum or range rule that rejects look-alikes (order numbers, dates, versions).
Detection is deliberately conservative about *numbers*: a bare run of digits is never a
phone number or an SSN, because datasets are full of ids and amounts.

Kinds (the keys of Dataset status `piiFindings`) and what they match:

- ``email``: ``local@domain.tld`` (RFC 5322 "dot-atom" subset; the TLD has 2+ letters).
- ``phone``: a number written like a phone number: North American ``555-123-4567``,
  ``(555) 123-4567``, ``555.123.4567``, ``+1 555 123 4567`` (the area code must not start
  with 0 or 1; separators are required, so a bare run of ten digits is not a phone), or international ``+CC`` followed by 6-14 more digits in
  groups separated by spaces, dots or dashes (8-15 digits in all, E.164).
- ``card``: payment card numbers: 13-19 digits, optionally grouped by single spaces or
  dashes, with a known issuer prefix (Visa 4, Mastercard 51-55 / 2221-2720, Amex 34/37,
  Discover 6011/644-649/65, JCB 35, Diners 300-305/36/38) AND a valid Luhn checksum.
- ``ssn``: US Social Security numbers written ``AAA-GG-SSSS`` (dashes required; area not
  000, 666 or 9xx, group not 00, serial not 0000).
- ``iban``: International Bank Account Numbers (2-letter country, 2 check digits, 11-30
  alphanumerics, optionally in groups of four) whose ISO 13616 mod-97 checksum is 1.
- ``address``: street addresses in the common English form ``<house number> <one to three
  capitalised words> <street type>``, e.g. ``221 Baker Street``, ``1600 Pennsylvania Ave``
  (street types: Street/St, Avenue/Ave, Road/Rd, Boulevard/Blvd, Lane/Ln, Drive/Dr,
  Court/Ct, Way, Place/Pl, Terrace, Parkway/Pkwy, Square/Sq, Highway/Hwy).

Government ids other than the US SSN are not detected (national formats vary too much to
check without false positives); IBANs are the financial id covered besides cards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "ssn": "[SSN]",
    "iban": "[IBAN]",
    "address": "[ADDRESS]",
}
KINDS = tuple(PLACEHOLDERS)


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def luhn_valid(number: str) -> bool:
    digits = [int(d) for d in _digits(number)]
    if not digits:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_issuer_known(digits: str) -> bool:
    two, three, four = int(digits[:2]), int(digits[:3]), int(digits[:4])
    return (
        digits[0] == "4"
        or 51 <= two <= 55 or 2221 <= four <= 2720  # Mastercard
        or two in (34, 37)  # Amex
        or four == 6011 or 644 <= three <= 649 or two == 65  # Discover
        or two == 35  # JCB
        or 300 <= three <= 305 or two in (36, 38)  # Diners
    )


def _card_ok(text: str) -> bool:
    digits = _digits(text)
    return 13 <= len(digits) <= 19 and _card_issuer_known(digits) and luhn_valid(digits)


def iban_valid(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    # Letters count as two-digit numbers A=10 .. Z=35 (ISO 7064 MOD 97-10).
    numeric = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(numeric) % 97 == 1


def _phone_ok(text: str) -> bool:
    return 8 <= len(_digits(text)) <= 15


def _longest_valid_prefix(check: Callable[[str], bool]) -> Callable[[str], int]:
    """Wrap a checksum rule so a candidate that ran on into following groups is cut back.

    "GB82 WEST 1234 5698 7654 32 THEN" greedily matches a fifth group "THEN"; trying the
    prefixes that end at a group separator finds the valid IBAN inside it.
    """
    def longest(candidate: str) -> int:
        ends = [len(candidate)] + [i for i in range(len(candidate) - 1, 0, -1) if candidate[i] in " -"]
        return next((end for end in ends if check(candidate[:end])), 0)
    return longest


def _whole(check: Callable[[str], bool]) -> Callable[[str], int]:
    return lambda candidate: len(candidate) if check(candidate) else 0


def _any(candidate: str) -> int:
    return len(candidate)


_STREET_TYPES = (
    "Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|"
    "Terrace|Parkway|Pkwy|Square|Sq|Highway|Hwy"
)

# Order matters: earlier kinds win where matches overlap (a card number is not also a phone).
# Each rule returns how much of a regex candidate is a real finding (0: none of it).
_PATTERNS: list[tuple[str, re.Pattern, Callable[[str], int]]] = [
    ("email", re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), _any),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"), _longest_valid_prefix(iban_valid)),
    ("card", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _longest_valid_prefix(_card_ok)),
    ("ssn", re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"), _any),
    ("phone", re.compile(
        r"(?<![\w+])(?:\+?1[ .-]?)?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])\d{3}[ .-]\d{4}(?![\w-])"
        r"|(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,6}(?![\w-])"), _whole(_phone_ok)),
    ("address", re.compile(
        rf"\b\d{{1,5}}[A-Za-z]? (?:[A-Z][a-z]+ ){{1,3}}(?:{_STREET_TYPES})\b\.?"), _any),
]


def find(text: str) -> list[Finding]:
    """All non-overlapping PII findings in text, in order of position."""
    taken: list[Finding] = []
    for kind, pattern, check in _PATTERNS:
        for m in pattern.finditer(text):
            length = check(m.group())
            start, end = m.start(), m.start() + length
            if not length or any(start < f.end and f.start < end for f in taken):
                continue
            taken.append(Finding(kind, start, end))
    return sorted(taken, key=lambda f: f.start)


def redact(text: str, findings: Optional[Iterable[Finding]] = None) -> str:
    """Replace every finding with its kind's placeholder, e.g. ``[EMAIL]``."""
    findings = find(text) if findings is None else sorted(findings, key=lambda f: f.start)
    out, pos = [], 0
    for f in findings:
        out.append(text[pos:f.start])
        out.append(PLACEHOLDERS[f.kind])
        pos = f.end
    out.append(text[pos:])
    return "".join(out)
