"""Filling in-the-wild jailbreak templates with a question.

Templates mark where the question goes in dozens of ways ("[INSERT PROMPT HERE]", "{prompt}",
"<PUT YOUR QUERY HERE>", ...); words in brackets that are not the question ("[INPUT]", "{char}") must
stay, or the filled prompt would no longer be the template its authors wrote.
"""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(
    r"<\|([^|<>\n]{1,60})\|>"  # <|INSERT_PROMPT_ON_RIGHT|>
    r"|\\?\[([^\[\]\n]{1,60}?)\\?\]"  # [INSERT PROMPT HERE], markdown-escaped \[PROMPT\]
    r"|\$?\{\{?([^{}\n]{1,60})\}\}?"  # {prompt}, {{prompt}}, ${prompt}, {INSERT_YOUR_PROMPT_HERE}
    r"|<([^<>\n]{1,60})>"  # <prompt>, <PUT YOUR QUERY HERE>
    r"|&lt;([^&<>\n]{1,60})&gt;"  # HTML-escaped <INSERT PROMPT HERE>
    r"|\b((?:INSERT|ENTER|WRITE|PUT) (?:YOUR )?(?:PROMPT|QUESTION) HERE)\b"  # bare: prompt = "INSERT PROMPT HERE"
)
_PLACEHOLDER_INNER = re.compile(
    r"(?P<verb>(?:insert|enter|put|write|type)\s+)?(?P<whose>(?:your|the|my|any|user'?s?)\s+)?"
    r"(?P<what>prompt|question|request|query|input)(?P<here>\s+(?:on\s+)?(?:here|right))?"
)


def _is_question_placeholder(inner: str) -> bool:
    """Whether a bracketed word stands for the user's question: "INSERT PROMPT HERE", "PROMPT", "your question…",
    "user_input", "PUT YOUR QUERY HERE"… but not "insert x", "INPUT", "Prompt 3" or "PROMPT CREATOR"."""
    s = " ".join(inner.replace("_", " ").replace("\\", " ").split()).lower().strip(" \"'“”‘’$.…:")
    m = _PLACEHOLDER_INNER.fullmatch(s)
    if not m:  # "Insert prompt that triggers OpenAI's censor here"
        return bool(re.fullmatch(r"insert (?:your |a |the )?(?:prompt|question)\b.*\bhere", s))
    return m["what"] in ("prompt", "question") or bool(m["verb"] or m["whose"] or m["here"])


def fill(template: str, question: str) -> str:
    """``template`` with its question placeholders replaced by ``question``, or the question after a blank line."""
    hits = 0

    def sub(m: re.Match[str]) -> str:
        nonlocal hits
        inner = next(g for g in m.groups() if g is not None)
        if not _is_question_placeholder(inner):
            return m.group(0)
        hits += 1
        return question

    filled = _PLACEHOLDER.sub(sub, template)
    return filled if hits else template.rstrip() + "\n\n" + question
