"""A site's governance checks of the final adapter, on its own data and base model; numbers only leave.

The server asks for them in the final evaluation's message (SiteChecks: which checks, the probe set).
The site writes the final adapter to a temporary folder exactly as the server will publish it, builds
the governance checks' own CheckContext on it (the base model from the site's copy, the site's validated
data) and runs the checks' own functions:

    bias  governance/bias.py on the policy's probe set (load_probes, score_probes, measures, verdicts),
          with the adapter and with the base model; and COUNTERFACTUAL PAIRS FROM THE SITE'S EVAL SPLIT:
          an eval example whose prompt (every non-assistant turn) names a gender ("she", "Mr", "his
          wife", ...) and whose responses name none becomes two examples, its prompt rewritten all-male
          and all-female, the site's own response kept verbatim as the open-ended answer. localGap is
          the between-groups difference of the response's whole-answer log-probability (bias.group_gaps,
          nats per answer, the measure the policy's maxGap bounds). Each example is in both groups, so
          the gap is the mean paired difference: only the gendered words differ. Examples whose response
          is gendered are skipped (rewriting it would make the two answers differ; keeping it would make
          one prompt contradict it). At most SiteChecks.maxLocalExamples examples, in data order.
    pii   governance/pii_memorization.py's pii_measures: findings by kind in train+eval and the
          memorization probe (greedy continuation up to each training PII) on the final adapter.

The reply (SiteCheckReport) holds counts and measures only: no text, no PII value, no probe answer,
no id from the site's data. A check that fails to run sends the check's name and the exception's
TYPE (its message could quote data); the site's own log has the traceback.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..logs import get_logger
from .aggregation import Arrays
from .config import (MAX_SITE_ERROR, MAX_SITE_REPORT_BYTES, BiasMeasures, SiteBias, SiteCheckReport, SiteChecks,
                     SiteConfig, SitePII)

log = get_logger("federation.site-checks")

#: Gendered words and their counterpart, male -> female. "her" maps back to "his" or "him" (below).
_PAIRS = {"he": "she", "him": "her", "his": "her", "himself": "herself", "man": "woman", "men": "women",
          "male": "female", "boy": "girl", "boys": "girls", "mr": "ms", "father": "mother",
          "fathers": "mothers", "husband": "wife", "husbands": "wives", "son": "daughter", "sons": "daughters",
          "brother": "sister", "brothers": "sisters", "uncle": "aunt", "nephew": "niece", "gentleman": "lady",
          "gentlemen": "ladies", "king": "queen", "sir": "madam", "dad": "mum", "boyfriend": "girlfriend",
          "grandfather": "grandmother", "grandson": "granddaughter"}
_TO_FEMALE = dict(_PAIRS)
_TO_MALE = {f: m for m, f in _PAIRS.items() if f != "her"} | {"mrs": "mr", "mom": "dad"}
_WORD = re.compile(r"\b(?:" + "|".join(sorted({*_TO_FEMALE, *_TO_MALE, "her"}, key=len, reverse=True)) + r")\b",
                   re.I)
#: After "her", a word that starts a new phrase means the object ("give her the refund" -> him).
_OBJECT_FOLLOWERS = {"the", "a", "an", "to", "and", "or", "that", "this", "with", "for", "about", "back", "up",
                     "in", "on", "at", "by", "from", "if", "when", "so", "but", "as"}


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def swap_gender(text: str, group: str) -> str:
    """`text` with every gendered word made `group` ("male" or "female")."""

    def replace(m: re.Match) -> str:
        word = m.group(0)
        low = word.lower()
        if group == "female":
            return _match_case(_TO_FEMALE.get(low, low), word)
        if low == "her":
            rest = text[m.end():].lstrip()
            following = re.match(r"[A-Za-z']+", rest)
            objective = following is None or following.group(0).lower() in _OBJECT_FOLLOWERS
            return _match_case("him" if objective else "his", word)
        return _match_case(_TO_MALE.get(low, low), word)

    return _WORD.sub(replace, text)


def gendered(text: str) -> bool:
    return _WORD.search(text) is not None


def local_pairs(examples: list, limit: int) -> list[tuple[str, object]]:
    """(group, example) for up to `limit` eval examples: the counterfactual pairs described above."""
    from ..formats import Example

    out: list[tuple[str, object]] = []
    used = 0
    for example in examples:
        if used >= limit:
            break
        if getattr(example, "parts", None):  # image-text: the picture is part of the prompt; not rewritten
            continue
        prompts = [c for role, c in example.messages if role != "assistant"]
        answers = [c for role, c in example.messages if role == "assistant"]
        if not answers or not any(gendered(c) for c in prompts) or any(gendered(c) for c in answers):
            continue
        for group in ("male", "female"):
            messages = tuple((role, c if role == "assistant" else swap_gender(c, group)) for role, c in example.messages)
            out.append((group, Example(messages, raw=example.raw)))
        used += 1
    return out


def _measures(ctx, probes: list[dict], pairs: list[tuple[str, object]]) -> BiasMeasures:
    """The bias check's measures of ctx.model as it behaves now, and the gap on the local pairs."""
    from ..governance.base import answer_scores
    from ..governance.bias import group_gaps, measures, score_probes, verdicts

    values = {}
    if probes:
        open_rows, decision_rows = score_probes(ctx, probes)
        values = {name: value for name, value, _, _ in verdicts(measures(open_rows, decision_rows), ctx.policy.bias)}
    local_gap = None
    if pairs:
        scores = answer_scores(ctx, [example for _, example in pairs])
        rows = [{"attribute": "gender", "group": group, "score": score, "tokens": tokens}
                for (group, _), (score, tokens) in zip(pairs, scores)]
        local_gap = group_gaps(rows)["gender"]["gap"]
    finite = lambda v: float(v) if v is not None and np.isfinite(v) else None  # noqa: E731
    return BiasMeasures(**{k: finite(v) for k, v in values.items()}, localGap=finite(local_gap))


def site_bias(ctx, wanted: SiteChecks) -> SiteBias:
    from ..governance.bias import load_probes

    probes = load_probes(wanted.probesURI)
    pairs = local_pairs(ctx.examples("eval"), wanted.maxLocalExamples)
    adapter = _measures(ctx, probes, pairs)
    with ctx.base_model_behaviour():
        base = _measures(ctx, probes, pairs)
    return SiteBias(probes=len(probes), localExamples=len(pairs) // 2, adapter=adapter, base=base)


def site_pii(ctx) -> SitePII:
    from ..governance.pii_memorization import pii_measures

    m = pii_measures(ctx)
    return SitePII(findings=m["findings"], probed=m["probed"], memorized=m["memorized"],
                   memorizationRate=m["memorizationRate"])


def check_context(site: SiteConfig, folder: Path):
    """The governance checks' CheckContext on the adapter in `folder`, this site's base model and data."""
    from finetune_operator.api.governance import GovernanceSpec

    from ..governance.base import CheckContext
    from .local_round import trainer_config

    # No GovernanceInputs: they are the governance Job's (Dataset spec, digests); nothing run here reads them.
    return CheckContext(config=trainer_config(site), policy=GovernanceSpec(), inputs=None,  # type: ignore[arg-type]
                        adapter_uri=f"file://{folder}", adapter_dir=folder, adapter_digest="", workdir=folder.parent)


def write_adapter(weights: Arrays, adapter_config: str, folder: Path) -> None:
    """The adapter as the server publishes it (server_app.write_adapter): the weights and adapter_config.json."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: np.ascontiguousarray(v, dtype=np.float32) for n, v in weights.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(json.loads(adapter_config), indent=2, sort_keys=True))


def run_site_checks(site: SiteConfig, weights: Arrays, adapter_config: str, wanted: SiteChecks) -> SiteCheckReport:
    """Every requested check; one that fails to run is named in `error` (never raised: the final evaluation
    and the other check go on)."""
    report = SiteCheckReport(site=site.site)
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="site-checks-") as tmp:
        folder = Path(tmp) / "adapter"
        ctx = None
        try:
            write_adapter(weights, adapter_config, folder)
            ctx = check_context(site, folder)
        except Exception as exc:  # noqa: BLE001 - reported as a type, logged here in full
            log.exception("site checks: adapter not loadable", extra={"event": "site_checks_failed", "site": site.site})
            errors.append(f"adapter: {type(exc).__name__}")
        for name, run in (("bias", lambda: site_bias(ctx, wanted)), ("pii", lambda: site_pii(ctx))):
            if name not in wanted.checks or ctx is None:
                continue
            try:
                setattr(report, name, run())
            except Exception as exc:  # noqa: BLE001
                log.exception(f"site check {name} failed", extra={"event": "site_check_failed", "site": site.site,
                                                                  "check": name})
                errors.append(f"{name}: {type(exc).__name__}")
    if errors:
        report.error = ("; ".join(errors) + " (see the site's log)")[:MAX_SITE_ERROR]
    log.info("site checks done", extra={"event": "site_checks", "site": site.site,
                                        "report": report.model_dump(mode="json", exclude_none=True)})
    return report


def parse_report(raw: object, site: str) -> SiteCheckReport:
    """The server's reading of a site's reply: a bounded JSON SiteCheckReport, its site the one the server
    bound the node to (never the name the reply claims); anything else is an error entry for that site."""
    if not isinstance(raw, str) or not raw:
        return SiteCheckReport(site=site, error="the site sent no check report")
    if len(raw.encode()) > MAX_SITE_REPORT_BYTES:
        return SiteCheckReport(site=site, error=f"the site's check report is over {MAX_SITE_REPORT_BYTES} bytes")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return SiteCheckReport.model_validate({**data, "site": site})
    except ValueError:
        return SiteCheckReport(site=site, error="the site's check report is malformed")


def missing_report(site: str, why: str = "the site did not reply to the final evaluation") -> SiteCheckReport:
    return SiteCheckReport(site=site, error=why)


def wanted_of(config: dict) -> Optional[SiteChecks]:
    """The SiteChecks an evaluate message carries, or None."""
    raw = config.get("site-checks")
    return SiteChecks.model_validate_json(str(raw)) if raw else None
