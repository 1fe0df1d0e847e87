"""Self-Instruct prompts: render the template over sampled seeds, and parse what the generator writes.

A seed example is shown as "Instruction: <prompt>\nResponse: <answer>"; the template's {examples}
holds the sampled seeds so rendered, separated by blank lines. The generator continues the prompt
(which, by default, ends with "Instruction:") with an instruction, "Response:" and the response;
`parse_output` takes the first such pair and ignores whatever the model writes after it: the response
ends at the first blank line (examples are separated by one) or where the model starts another
"Instruction:" / "Response:" / "Example N:" line. Multi-paragraph responses are therefore cut to their
first paragraph (a documented limit of the format).
"""

from __future__ import annotations

import hashlib
import re
import string
from typing import Optional

from finetune_operator.api.synthetic import DEFAULT_TEMPLATE

from ..curation import answer_text, prompt_text
from ..errors import ConfigError
from ..formats import Example

PLACEHOLDERS = ("examples", "n_seeds", "n")
TEMPLATE_FIELD = "spec.selfInstruct.template"

_RESPONSE = re.compile(r"\bresponse\s*:", re.IGNORECASE)
_LEADING_INSTRUCTION = re.compile(r"^\s*(?:###\s*)?instruction\s*:\s*", re.IGNORECASE)
# Where the response ends: a blank line (the prompt separates examples by one), or the next example
# the model starts on its own.
_END = re.compile(r"\n\s*\n|^\s*(?:###\s*)?(?:instructions?|response|example\s*\d*)\s*:",
                  re.IGNORECASE | re.MULTILINE)


def check_template(template: str) -> None:
    """A template must hold {examples} and no other placeholder than PLACEHOLDERS; a ConfigError names the field."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:  # a lone "{" or "}": literal braces are written {{ and }}
        raise ConfigError(f"{TEMPLATE_FIELD}: {exc} (write literal braces as {{{{ and }}}})") from None
    allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    for name in names:
        if name not in PLACEHOLDERS:
            shown = "{" + name[:40] + "}" if name else "{}"
            raise ConfigError(f"{TEMPLATE_FIELD}: unknown placeholder {shown} (allowed: {allowed})")
    if "examples" not in names:
        raise ConfigError(f"{TEMPLATE_FIELD}: the template must contain {{examples}} (the sampled seed examples)")


def template_text(template: Optional[str]) -> str:
    text = template if template is not None else DEFAULT_TEMPLATE
    check_template(text)
    return text


def template_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def show_example(example: Example) -> str:
    return f"Instruction: {prompt_text(example).strip()}\nResponse: {answer_text(example).strip()}"


def render(template: str, seeds: list[Example]) -> str:
    return template.format(examples="\n\n".join(show_example(s) for s in seeds), n_seeds=len(seeds),
                           n=len(seeds) + 1)


def parse_output(text: str) -> Optional[tuple[str, str]]:
    """(instruction, response) from the generator's continuation, or None when it has no such pair."""
    found = _RESPONSE.search(text)
    if found is None:
        return None
    instruction = _LEADING_INSTRUCTION.sub("", text[:found.start()], count=1).strip()
    rest = text[found.end():]
    end = _END.search(rest)
    response = (rest[:end.start()] if end else rest).strip()
    if not instruction or not response:
        return None
    return instruction, response


def to_example(instruction: str, response: str, fmt: str) -> dict:
    """The example in the spec's format (a Dataset line without metadata)."""
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]}
    if fmt == "instruction":
        return {"instruction": instruction, "output": response}
    if fmt == "completion":
        return {"prompt": instruction, "completion": response}
    raise ConfigError(f"spec.format: {fmt!r} cannot be generated (chat, instruction or completion)")
