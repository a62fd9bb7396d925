"""A small, streaming MediaWiki XML dump -> plain-text extractor (no third-party dependencies).

Reads a ``pages-articles`` dump (optionally bz2-compressed) with ``xml.etree.ElementTree.iterparse`` and yields
``(title, text)`` for namespace-0 pages that are not redirects. The wikitext markup is reduced to prose:

* templates ``{{...}}`` (nested), tables ``{|...|}`` (nested), ``<ref>`` citations, HTML comments, ``<math>`` /
  ``<gallery>`` / ``<timeline>`` blocks and ``__MAGIC__`` words are removed;
* ``[[File:..]]`` / ``[[Image:..]]`` / ``[[Category:..]]`` and interlanguage links are removed (with nested
  caption links); ``[[target|label]]`` becomes ``label`` and ``[[target]]`` becomes ``target``;
  ``[http://url label]`` becomes ``label``;
* bold / italic quote marks, remaining HTML tags (keeping their content) and list / indentation markers are
  stripped; ``== Heading ==`` becomes ``Heading`` on its own line; HTML entities are decoded;
* trailing apparatus sections (References, See also, External links, Notes, Further reading, ...) are dropped.

The output keeps case and punctuation, so it is suitable as language-model text.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import IO

# Bump when the cleaning rules change: the built-in dataset cache is keyed on it.
EXTRACTOR_VERSION = 1

_DROP_SECTIONS = {
    "references", "notes", "see also", "external links", "further reading", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "references and notes", "works cited", "primary sources",
    "secondary sources", "other sources", "external link", "reference", "note", "gallery", "literature",
}
_DROP_LINK_NS = {"file", "image", "category", "media"}
_BLOCK_TAGS = ("math", "gallery", "timeline", "imagemap", "score", "hiero", "chem", "ce", "graph", "mapframe",
               "references", "syntaxhighlight", "source", "templatedata")

_RE_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_RE_REF_SELF = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_RE_REF = re.compile(r"<ref\b[^>]*>.*?(?:</ref\s*>|$)", re.I | re.S)
_RE_BLOCKS = re.compile(
    r"<(%s)\b[^>]*?(?:/\s*>|>.*?(?:</\1\s*>|$))" % "|".join(_BLOCK_TAGS), re.I | re.S
)
_RE_BR = re.compile(r"<br\s*/?\s*>", re.I)
_RE_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*?/?>")
_RE_EXTLINK = re.compile(r"\[(?:https?:|ftp:|mailto:|news:|//)[^\s\]]*(?:\s+([^\]]*))?\]")
_RE_BARE_URL = re.compile(r"https?://\S+")
_RE_QUOTES = re.compile(r"'{2,}")
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_RE_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]{2,10})*$")
_RE_EMPTY_PARENS = re.compile(r"\(\s*[,;:.]*\s*\)")
_RE_PARENS_LEAD = re.compile(r"\(\s*[,;:]\s*")
_RE_SPACE_PUNCT = re.compile(r"[ \t]+([,.;:!?)])")
_RE_OPEN_PAREN_SPACE = re.compile(r"\([ \t]+")
_RE_MULTI_SPACE = re.compile(r"[ \t\u00a0]+")
_RE_MULTI_NL = re.compile(r"\n{3,}")


def _strip_nested(text: str, open_: str, close: str, *, line_start: bool = False) -> str:
    """Remove every (possibly nested) ``open_ ... close`` span. Unbalanced openers run to the end of the text.

    With ``line_start`` an opener/closer only counts at the beginning of a line (after optional spaces), as for
    wiki tables ``{|`` / ``|}``.
    """
    out: list[str] = []
    depth = 0
    i = 0
    n = len(text)
    lo, lc = len(open_), len(close)
    start = 0
    while i < n:
        if text.startswith(open_, i) and (not line_start or _at_line_start(text, i)):
            if depth == 0:
                out.append(text[start:i])
            depth += 1
            i += lo
            continue
        if depth and text.startswith(close, i) and (not line_start or _at_line_start(text, i)):
            depth -= 1
            i += lc
            if depth == 0:
                start = i
            continue
        i += 1
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def _at_line_start(text: str, i: int) -> bool:
    j = i - 1
    while j >= 0 and text[j] in " \t":
        j -= 1
    return j < 0 or text[j] == "\n"


def _replace_links(text: str) -> str:
    """Resolve ``[[...]]`` links (nested for file captions): drop file/category/interlanguage, keep labels."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        j = text.find("[[", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        # find the matching ]] allowing nesting
        depth = 0
        k = j
        while k < n:
            if text.startswith("[[", k):
                depth += 1
                k += 2
            elif text.startswith("]]", k):
                depth -= 1
                k += 2
                if depth == 0:
                    break
            else:
                k += 1
        inner = text[j + 2 : k - 2] if depth == 0 else text[j + 2 :]
        out.append(_link_text(inner))
        i = k
    return "".join(out)


def _link_text(inner: str) -> str:
    target, _, label = inner.partition("|")
    prefix, sep, _rest = target.partition(":")
    p = prefix.strip().lower()
    if sep and (p in _DROP_LINK_NS or (_RE_LANG_PREFIX.match(p) and not label)):
        return ""
    if label:
        # a label may itself contain links (rare outside file captions); resolve them
        label = label.rsplit("|", 1)[-1] if "[[" not in label else _replace_links(label)
        return label
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X]] is a visible link to a category page
        target = target[1:]
    if "#" in target:
        page, _, anchor = target.partition("#")
        target = page or anchor
    return target


def wikitext_to_plain(text: str) -> str:
    """Convert one article's wikitext to plain prose (see the module docstring for the rules)."""
    text = _RE_COMMENT.sub("", text)
    text = _RE_REF_SELF.sub("", text)
    text = _RE_REF.sub("", text)
    text = _RE_BLOCKS.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}", line_start=True)
    text = _replace_links(text)
    text = _RE_EXTLINK.sub(lambda m: m.group(1) or "", text)
    text = _RE_BR.sub("\n", text)
    text = _RE_TAG.sub("", text)
    text = _RE_QUOTES.sub("", text)
    text = _RE_MAGIC.sub("", text)
    text = html.unescape(text)
    text = _RE_TAG.sub("", text)  # tags that were entity-encoded twice (&amp;lt;...)
    text = _RE_BARE_URL.sub("", text)

    lines: list[str] = []
    skip_level = 0  # > 0 while inside a dropped section of that heading level
    for raw in text.split("\n"):
        line = raw.strip()
        m = _RE_HEADING.match(line)
        if m:
            level, title = len(m.group(1)), m.group(2).strip()
            if skip_level and level > skip_level:
                continue
            if title.lower().rstrip(":") in _DROP_SECTIONS:
                skip_level = level
                continue
            skip_level = 0
            if title:
                lines.append("")
                lines.append(title)
            continue
        if skip_level:
            continue
        if line.startswith(("|", "!", "{|", "|}")):  # remnants of malformed tables
            continue
        line = line.lstrip("*#:;").strip()
        if line in ("----",):
            continue
        lines.append(line)

    text = "\n".join(lines)
    text = _RE_EMPTY_PARENS.sub("", text)
    text = _RE_PARENS_LEAD.sub("(", text)
    text = _RE_MULTI_SPACE.sub(" ", text)
    text = _RE_OPEN_PAREN_SPACE.sub("(", text)
    text = _RE_SPACE_PUNCT.sub(r"\1", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _RE_MULTI_NL.sub("\n\n", text)
    return text.strip()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_wiki_pages(fileobj: IO[bytes]) -> Iterator[tuple[str, str, str, bool]]:
    """Stream ``(title, namespace, wikitext, is_redirect)`` for each ``<page>`` of a MediaWiki XML dump."""
    for _event, elem in ET.iterparse(fileobj, events=("end",)):
        if _local(elem.tag) != "page":
            continue
        title = ns = ""
        text = ""
        redirect = False
        for child in elem.iter():
            name = _local(child.tag)
            if name == "title":
                title = child.text or ""
            elif name == "ns":
                ns = (child.text or "").strip()
            elif name == "redirect":
                redirect = True
            elif name == "text":
                text = child.text or ""
        elem.clear()
        yield title, ns, text, redirect or text.lstrip()[:9].lower() == "#redirect"


def extract_articles(path: str, min_words: int = 50) -> list[tuple[str, str]]:
    """Plain-text ``(title, text)`` of the namespace-0, non-redirect articles with at least ``min_words`` words."""
    opener = bz2.open if str(path).endswith(".bz2") else open
    out: list[tuple[str, str]] = []
    with opener(path, "rb") as f:
        for title, ns, text, redirect in iter_wiki_pages(f):
            if ns != "0" or redirect:
                continue
            plain = wikitext_to_plain(text)
            if len(plain.split()) >= min_words:
                out.append((title, plain))
    return out
