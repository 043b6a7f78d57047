"""Plain text out of the files that documentation packages install: gzip, HTML, and man-page troff.

Each routine is small and standard-library only. They aim at text a model would read (words,
code, tables kept as lines), not at a faithful rendering: layout requests are dropped, fonts
and navigation are stripped, and what cannot be understood is left out rather than guessed.
"""

from __future__ import annotations

import gzip
import re
from html.parser import HTMLParser
from pathlib import Path

MAN_SUFFIX = re.compile(r"\.[1-9][a-z]*$")  # open.2, printf.3, ls.1, x.3perl, aio.7type


def read_text(path: Path) -> str:
    """A file's text: decompressed if it ends in .gz, then HTML or troff turned into plain text
    (by the name under the .gz: .html/.htm, or a man section suffix inside a `man*` folder)."""
    raw = path.read_bytes()
    name = path.name
    if name.endswith(".gz"):
        raw, name = gzip.decompress(raw), name[: -len(".gz")]
    text = raw.decode("utf-8", errors="replace")
    if name.endswith((".html", ".htm")):
        return html_to_text(text)
    if MAN_SUFFIX.search(name) and path.parent.name.startswith("man"):
        return troff_to_text(text)
    return text


# --- HTML ---------------------------------------------------------------------------------------

_BLOCK = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "pre", "blockquote", "section",
          "h1", "h2", "h3", "h4", "h5", "h6", "hr", "title", "article", "header", "footer", "figure", "caption"}
_SKIP_TAGS = {"script", "style", "nav", "noscript", "svg", "template"}
# Navigation bars that docbook (postgres, debian-handbook; its "banner" too) and Sphinx repeat on every page.
_SKIP_CLASSES = {"navheader", "navfooter", "docnav", "sphinxsidebar", "related", "footer", "headerlink"}
_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "track", "wbr"}


class _TextParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip: list[str] = []  # open tags of a skipped element (its own tag first)
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if self.skip:
            if tag not in _VOID:
                self.skip.append(tag)
            return
        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES or attributes.get("role") == "navigation" or attributes.get("id") == "banner":
            if tag not in _VOID:
                self.skip.append(tag)
            return
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append("\t")

    def handle_startendtag(self, tag, attrs):
        if not self.skip and tag in _BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.skip:
            if tag in self.skip:  # close up to the matching tag (tolerates unclosed <p> and the like)
                while self.skip and self.skip.pop() != tag:
                    pass
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith(("\n", "\t")):
                data = data.lstrip()  # the indentation of the HTML source is not text
        if data:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """The readable text of an HTML page: blocks on their own lines, <pre> kept verbatim, table cells
    tab-separated; scripts, styles, <head> and navigation bars dropped; entities decoded."""
    body = re.split(r"</head\s*>", html, maxsplit=1, flags=re.IGNORECASE)[-1]
    parser = _TextParser()
    parser.feed(body)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(line if line.strip() else "" for line in lines))
    return text.strip() + "\n" if text.strip() else ""


# --- troff (man pages) --------------------------------------------------------------------------

_GLYPHS = {"em": "\u2014", "en": "\u2013", "hy": "-", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d",
           "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
           "mu": "\u00d7", "di": "\u00f7", "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260",
           "->": "\u2192", "<-": "\u2190", "ti": "~", "ha": "^", "rs": "\\", "ga": "`", "ul": "_", "sl": "/",
           "dg": "\u2020", "de": "\u00b0", "sc": "\u00a7", "pc": "\u00b7", "fm": "\u2032", "Fo": "\u00ab",
           "Fc": "\u00bb", "lA": "\u21d0", "rA": "\u21d2", "ss": "\u00df", "'e": "\u00e9", "`e": "\u00e8"}
_ESCAPE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\(..|.)"          # font: \fB \f(CW \f[BI]
    r"|s[+-]?(?:\d+|\(\d\d|\[[^\]]*\])"  # size: \s-1 \s0
    r"|\*(?:\[[^\]]*\]|\(..|.)"         # string register: \*(lq \*R
    r"|\((?P<glyph2>..)"                 # glyph: \(em
    r"|\[(?P<glyph>[^\]]*)\]"            # glyph: \[em] \[u2014]
    r"|[kgnmMVY](?:\[[^\]]*\]|\(..|.)"  # registers, colours, marks
    r"|[hvwlLDNoxbCRXSHZ]'[^']*'"        # motions and drawing with a quoted argument
    r"|(?P<char>.)"                      # one-character escapes: \- \e \& \| \^ \% \c \ (space)
    r")"
)
_ONE_CHAR = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", ".": ".", "'": "'", "`": "`"}
_TEXT_MACROS = {"B", "I", "SM", "SB", "OP", "Nm", "Nd"}  # their arguments are text
_JOINED_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}  # alternating fonts: arguments join without spaces
_ARGS = re.compile(r'"((?:[^"]|"")*)"|(\S+)')


def _unescape(line: str) -> str:
    def replace(match: re.Match) -> str:
        glyph = match.group("glyph2") or match.group("glyph")
        if glyph is not None:
            if glyph.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", glyph):
                return chr(int(glyph[1:], 16))
            return _GLYPHS.get(glyph, "")
        char = match.group("char")
        return _ONE_CHAR.get(char, "") if char is not None else ""

    return _ESCAPE.sub(replace, line)


def troff_to_text(source: str) -> str:
    """The words of a man page (man macros in troff): filled text joined into paragraphs, no-fill
    blocks (.nf, .EX) and table rows kept line by line, headings and list tags on their own lines,
    escapes turned into characters or dropped; comments, layout requests, macro definitions and
    tbl format lines dropped. A page that only points at another (`.so man3/x.3`) yields ""."""
    source = re.sub(r"\\\n", "", source)  # a trailing backslash continues the line
    lines: list[str] = []
    paragraph: list[str] = []
    fill, in_definition, table, table_format, tag_next = True, False, False, False, False

    def flush() -> None:
        if paragraph:
            lines.append(" ".join(paragraph))
            paragraph.clear()

    def text(words: str) -> None:
        nonlocal tag_next
        if fill and not table and not tag_next:
            paragraph.append(words.strip())
        else:
            flush()
            lines.append(words.rstrip())
            tag_next = False

    for line in source.split("\n"):
        if in_definition:
            in_definition = not line.startswith("..")
            continue
        if line.startswith(('.\\"', "'\\\"", '\\"', ".\\#")):
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].strip().partition(" ")
            args = [m.group(2) if m.group(1) is None else m.group(1).replace('""', '"') for m in _ARGS.finditer(rest)]
            if request in ("de", "de1", "am", "ig"):
                in_definition = True
            elif request == "so":
                return ""
            elif request in ("SH", "SS", "Sh", "Ss"):
                flush()
                lines.extend(["", _unescape(" ".join(args))])
            elif request in _TEXT_MACROS or request in _JOINED_MACROS:
                if args:
                    text(_unescape(("" if request in _JOINED_MACROS else " ").join(args)))
            elif request in ("PP", "LP", "P", "sp", "Pp", "IP", "TP", "TQ"):
                flush()
                if request in ("IP", "TP", "TQ"):
                    if request == "IP" and args:  # .IP tag indent: the tag is text
                        lines.append(_unescape(args[0]))
                    tag_next = request != "IP"  # .TP: the next line is the tag
                else:
                    lines.append("")
            elif request in ("nf", "EX", "fi", "EE"):
                flush()
                fill = request in ("fi", "EE")
            elif request in ("TS", "TE"):
                flush()
                table = table_format = request == "TS"
            elif request in ("br", "RS", "RE", "in"):
                flush()
            continue  # every other request or macro is layout
        if table_format:
            table_format = not line.rstrip().endswith(".")  # format lines end with '.'; the rows follow
            continue
        if not line.strip():
            flush()
            lines.append("")
            continue
        if table:  # tbl text blocks: a cell "T{", its lines, then "T}" and the rest of the row
            if line.strip() == "T{":
                continue
            line = re.sub(r"\s*T\{$", "", re.sub(r"^T\}", "", line))
        text(_unescape(line))
    flush()
    text_out = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in lines))
    return text_out.strip() + "\n" if text_out.strip() else ""
