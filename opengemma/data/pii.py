"""The one personal-data detector of the project (report "Filtering": personal and sensitive data
are removed from the pretraining data; "Memorization Evaluations": memorized text is scanned for
it, split by severity). The data pipeline and the memorization evaluation both use this module.

No maintained PII detector installs and runs offline here (Presidio needs a spaCy model download;
``datafog`` misses most phone and card formats: see the datasets README), so detection is
regular expressions with validity checks, measured on ``pii_presidio_synth``
(``bench/results/pii.md``):

* ``sensitive``: payment card numbers (13-19 digits passing the Luhn check), US social security
  numbers (area/group/serial rules), IBANs (ISO 13616 mod-97 check);
* ``personal``: e-mail addresses, phone numbers (7-15 digits, national and international
  layouts), street addresses (number + capitalised name + street word), IPv4 and IPv6 addresses.

:func:`scan` returns one :class:`Finding` per match (a span is reported once, sensitive kinds
first); :func:`redact` replaces spans by ``[KIND]`` placeholders; :func:`apply_policy` applies a
per-severity action (``drop`` the document, ``redact`` the spans, ``keep``). Sensitive data may
only be dropped or redacted, never kept: :func:`check_policy` refuses ``keep`` for it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import OpenGemmaError

SENSITIVE, PERSONAL = "sensitive", "personal"
SEVERITY = {"credit_card": SENSITIVE, "ssn": SENSITIVE, "iban": SENSITIVE,
            "email": PERSONAL, "phone": PERSONAL, "address": PERSONAL, "ip": PERSONAL}
ACTIONS = ("drop", "redact", "keep")
DEFAULT_POLICY = {SENSITIVE: "redact", PERSONAL: "redact"}


@dataclass(frozen=True)
class Finding:
    kind: str  # credit_card, ssn, iban, email, phone, address, ip
    severity: str  # "sensitive" or "personal"
    text: str
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.text)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (payment card numbers)."""
    if not digits.isdigit() or len(digits) < 2:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """ISO 13616: country code, two check digits, 11-30 alphanumerics, mod 97 == 1."""
    s = re.sub(r"\s", "", text).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", s) or s[:2] not in _IBAN_COUNTRIES:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


# 13-19 digits in one run, or grouped 4-4-4-(1-7) / Amex 4-6-5 with one separator; never part of a
# decimal number, a longer digit run or arithmetic ("0.004277569313094809", "14000-3920-1000")
_CARD = re.compile(r"(?<![\w.,+-])(?:\d{12,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5})"
                   r"(?![\w-]|[.,]\d|\s*[=*/+])")
_MAESTRO = ("5018", "5020", "5038", "5893", "6304", "6759", "6761", "6762", "6763")  # 12-digit cards
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])")
_IBAN = re.compile(r"\b[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,3})?\b")
_IBAN_COUNTRIES = frozenset(
    "AD AE AL AT AZ BA BE BG BH BI BR BY CH CR CY CZ DE DJ DK DO EE EG ES FI FK FO FR GB GE GI GL GR GT HR HU IE IL "
    "IQ IS IT JO KW KZ LB LC LI LT LU LV LY MC MD ME MK MN MR MT MU NI NL NO OM PK PL PS PT QA RO RS RU SA SC SD SE "
    "SI SK SM SO ST SV TL TN TR UA VA VG XK YE".split())  # countries that issue IBANs (ISO 13616 registry)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# International (+CC, optional "(0)") or national layouts: groups of 2-4 digits after an optional
# area code, with space/dot/dash separators; 7-15 digits in all (checked after the match).
_PHONE = re.compile(
    r"(?<![\w+.-])(?!\d{4}-\d\d-\d\d)(?:\+\d{1,3}[ .-]?(?:\(0\)[ .-]?)?|00\d{1,3}[ .-])?(?:\(\d{1,4}\)[ .-]?|\d{1,5}[ .-])"
    r"\d{2,7}(?:[ .-]\d{2,4}){0,3}(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![\w-])(?!\.\d)")
_STREET_WORDS = (r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Way|Terrace|"
                 r"Square|Sq|Parkway|Pkwy|Highway|Hwy|Route|Circle|Cir|Trail|Trl|Crescent|Close|Alley|Plaza|Mews|Pike")
_ADDRESS = re.compile(
    # house number + 1-4 capitalised words (not all capitals: "27 MPG Hwy") + a street word
    rf"\b\d{{1,6}}[A-Za-z]?[ \t]+(?:[A-Z][a-z][\w'.-]*[ \t]+|[A-Z][ \t]+){{1,4}}(?:{_STREET_WORDS})\b\.?"
    r"(?:,?[ \t]+(?:Apt\.?|Suite|Unit|#)[ \t]*\d+[A-Za-z]?)?"
    # European order: name + street word glued (Koskikatu, Hauptstraße, Vesterskovvej) + number
    r"|\b[A-Z][\w'-]*(?:straße|strasse|str\.|vej|gade|katu|tie|kuja|gatan|vägen|väg|veien|vei|weg|laan|straat|"
    r"plein|allee|platz|gasse|ulica|utca)[ \t]+\d{1,5}[A-Za-z]?\b(?:,?[ \t]+(?:Apt\.?|Suite|Unit)[ \t]*\d+[A-Za-z]?)?")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}(?::|[0-9A-Fa-f]{1,4})(?:[0-9A-Fa-f:]*)(?![\w:])")


_NANP = re.compile(r"\d{3}([-. ])\d{3}\1\d{4}|\d{3}[-. ]\d{4}")
_MATH = re.compile(r"[=<>*/+]\s*$")


def _phone_like(s: str, text: str, start: int, end: int) -> bool:
    """A number-shaped match that is laid out as a phone number: 7-15 digits and either an
    international prefix, a bracketed area code, a North American layout (555-123-4567, 555-1234)
    or a national trunk prefix 0; not arithmetic ("1000-200 = 800") nor a range of years."""
    digits = sum(c.isdigit() for c in s)
    if not 7 <= digits <= 15:
        return False
    if _MATH.search(text[max(0, start - 3):start]) or re.match(r"\s*[=<>*/+]", text[end:end + 3]):
        return False
    return s.startswith(("+", "(", "00")) or bool(_NANP.fullmatch(s)) or (s[0] == "0" and digits >= 9)


def _ipv6_valid(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def scan(text: str) -> list[Finding]:
    """Every personal-data match in ``text``, in text order; sensitive kinds are matched first and
    a span overlapping an earlier match is not reported again."""
    found: list[Finding] = []
    taken: list[tuple[int, int]] = []

    def add(kind, m):
        a, b = m.span()
        if any(x < b and a < y for x, y in taken):
            return
        taken.append((a, b))
        found.append(Finding(kind, SEVERITY[kind], m.group(), a))

    for m in _IBAN.finditer(text):  # first: an IBAN's digits may pass the Luhn check by chance
        if iban_valid(m.group()):
            add("iban", m)
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if luhn_valid(digits) and (13 <= len(digits) <= 19 or (len(digits) == 12 and digits.startswith(_MAESTRO))):
            add("credit_card", m)
    for m in _SSN.finditer(text):
        add("ssn", m)
    for m in _EMAIL.finditer(text):
        add("email", m)
    for m in _IPV4.finditer(text):
        add("ip", m)
    for m in _IPV6.finditer(text):
        if _ipv6_valid(m.group()):
            add("ip", m)
    for m in _ADDRESS.finditer(text):
        add("address", m)
    for m in _PHONE.finditer(text):
        if _phone_like(m.group(), text, m.start(), m.end()):
            add("phone", m)
    return sorted(found, key=lambda f: f.start)


def severity_counts(texts: Iterable[str]) -> dict:
    """How many texts contain sensitive / personal data (a text counts once, at its worst level),
    and the matches per kind."""
    out = {SENSITIVE: 0, PERSONAL: 0, "by_kind": {}}
    for t in texts:
        fs = scan(t)
        for f in fs:
            out["by_kind"][f.kind] = out["by_kind"].get(f.kind, 0) + 1
        if any(f.severity == SENSITIVE for f in fs):
            out[SENSITIVE] += 1
        elif fs:
            out[PERSONAL] += 1
    return out


def redact(text: str, findings: Iterable[Finding]) -> str:
    """``text`` with each finding's span replaced by ``[KIND]`` (e.g. ``[EMAIL]``)."""
    parts, pos = [], 0
    for f in sorted(findings, key=lambda f: f.start):
        if f.start < pos:
            continue
        parts += [text[pos:f.start], f"[{f.kind.upper()}]"]
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts)


def check_policy(policy: dict | None) -> dict:
    """A complete per-severity policy from a partial one; one clear error for a bad one."""
    out = dict(DEFAULT_POLICY)
    for severity, action in (policy or {}).items():
        if severity not in out:
            raise OpenGemmaError(f"pii: unknown severity {severity!r} (use {SENSITIVE!r} or {PERSONAL!r})")
        if action not in ACTIONS:
            raise OpenGemmaError(f"pii.{severity}: unknown action {action!r} (use one of {', '.join(ACTIONS)})")
        out[severity] = action
    if out[SENSITIVE] == "keep":
        raise OpenGemmaError("pii.sensitive = 'keep' is not allowed: sensitive data (cards, government ids, "
                             "IBANs) must never reach the shards; use 'drop' or 'redact'")
    return out


def apply_policy(text: str, policy: dict) -> tuple[str | None, list[Finding]]:
    """(text with the ``redact`` severities redacted, or None when a ``drop`` severity is found;
    every finding). ``policy`` as returned by :func:`check_policy`."""
    findings = scan(text)
    if not findings:
        return text, findings
    severities = {f.severity for f in findings}
    if any(policy[s] == "drop" for s in severities):
        return None, findings
    return redact(text, [f for f in findings if policy[f.severity] == "redact"]), findings
