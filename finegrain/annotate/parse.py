"""Robust parsing of an MLLM's answer into (detailed caption, region descriptions).

The default prompt (``DEFAULT_PROMPT``) asks for JSON ``{"caption": ..., "regions": [...]}``
as GRAIN's annotation step does (a detailed caption plus short descriptions of the visible
objects/parts). Real models drift from the format, so the parser accepts, in order:

1. a JSON object (anywhere in the text, code fences allowed) with a caption under
   ``caption`` / ``description`` / ``long_caption`` and a list under ``regions`` /
   ``descriptions`` / ``objects`` (strings, or dicts with ``text`` / ``description``);
2. a JSON list of strings (regions only);
3. bullet or numbered lines (``-``, ``*``, ``•``, ``1.``, ``2)``) as regions, the other
   non-empty lines joined as the caption.

Anything else is *unparseable*: ``ok`` is False, the sample is kept without regions and the
pipeline counts it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

DEFAULT_PROMPT = (
    "Describe this image in detail in one paragraph, then list up to 8 short descriptions of "
    "distinct visible objects or parts (each names the object and its attributes). Answer only "
    'with JSON: {"caption": "<detailed caption>", "regions": ["<description>", ...]}'
)

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+(.*\S)\s*$")
_CAPTION_KEYS = ("caption", "description", "long_caption", "detailed_caption")
_REGION_KEYS = ("regions", "descriptions", "objects", "region_descriptions", "parts")


@dataclass
class Parsed:
    caption: str = ""
    regions: list[str] = field(default_factory=list)
    ok: bool = False


def _clean(items: list, max_regions: int) -> list[str]:
    out: list[str] = []
    for it in items:
        if isinstance(it, dict):
            it = it.get("text") or it.get("description") or it.get("name") or ""
        text = " ".join(str(it).split()).strip(" .;,")
        if text and text not in out:
            out.append(text)
    return out[:max_regions]


def _json_candidates(text: str) -> list[str]:
    """Substrings that may be JSON: fenced blocks, then the outermost {...} and [...] spans."""
    cands = re.findall(r"```(?:json)?\s*(.*?)```", text, flags=re.S)
    for open_, close in (("{", "}"), ("[", "]")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            cands.append(text[i : j + 1])
    return cands


def _from_json(obj: object, max_regions: int) -> Parsed | None:
    if isinstance(obj, list):
        regions = _clean(obj, max_regions)
        return Parsed("", regions, True) if regions else None
    if not isinstance(obj, dict):
        return None
    caption = next((str(obj[k]) for k in _CAPTION_KEYS if isinstance(obj.get(k), str)), "")
    items = next((obj[k] for k in _REGION_KEYS if isinstance(obj.get(k), list)), None)
    if items is None and not caption:
        return None
    return Parsed(" ".join(caption.split()), _clean(items or [], max_regions), True)


def parse_description(text: str, max_regions: int = 16) -> Parsed:
    """Parse one MLLM answer; see the module docstring for the accepted formats."""
    text = text or ""
    for cand in _json_candidates(text):
        try:
            parsed = _from_json(json.loads(cand), max_regions)
        except (json.JSONDecodeError, ValueError):
            continue
        if parsed is not None:
            return parsed
    bullets, prose = [], []
    for line in text.splitlines():
        m = _BULLET.match(line)
        if m:
            bullets.append(m.group(1))
        elif line.strip() and not line.strip().endswith(":"):
            prose.append(line.strip())
    if bullets:
        return Parsed(" ".join(prose), _clean(bullets, max_regions), True)
    return Parsed(" ".join(" ".join(prose).split()), [], False)
