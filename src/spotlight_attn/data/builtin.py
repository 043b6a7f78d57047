"""Built-in offline corpora: the Python installation's own text, and Debian packages of documentation
and source code (see the package docstring for the list; docs/CORPORA.md for their sizes).

A Debian corpus is the files that its packages installed, found through dpkg's file lists
(/var/lib/dpkg/info/<package>.list), so it holds exactly those packages' files whatever else the
machine has. One file is one document, read with markup.read_text (gzip, HTML, troff handled).
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from spotlight_attn.data.markup import read_text
from spotlight_attn.errors import SpotlightError

Document = tuple[str, str]  # (id, text)
DPKG_INFO = Path("/var/lib/dpkg/info")
# The marks of generated source: Go's convention (golang.org/s/generatedcode) and the common others.
GENERATED = re.compile(r"Code generated .*DO NOT EDIT|automatically generated|@generated", re.IGNORECASE)
PYTHON_DOC = f"python{sys.version_info.major}.{sys.version_info.minor}-doc"  # the same version as pydocs


def _stdlib_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        yield f"stdlib:{path.relative_to(root)}", path.read_text(encoding="utf-8", errors="replace")


def _kjv_documents() -> Iterator[Document]:
    """One document per book of the Bible, read with Debian's `bible` program."""
    program = shutil.which("bible")
    if program is None:
        raise SpotlightError("corpus 'kjv' needs Debian's bible-kjv-text: apt-get install bible-kjv-text")
    text = subprocess.run(
        [program, "-l0", "gen1:1-rev22:21"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True
    ).stdout
    # The program prints "<Book> <chapter>" headers (e.g. "1 Samuel 3"), then indented verses.
    book, lines = None, []
    for line in text.splitlines():
        words = line.split()
        if words and not line.startswith(" ") and words[-1].isdigit() and len(words) >= 2:
            if " ".join(words[:-1]) != book:
                if book is not None:
                    yield f"kjv:{book}", "\n".join(lines).strip() + "\n"
                book, lines = " ".join(words[:-1]), []
        lines.append(line)
    if book is not None:
        yield f"kjv:{book}", "\n".join(lines).strip() + "\n"


def _license_documents() -> Iterator[Document]:
    paths = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file() and not p.is_symlink())
    python_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    for path in paths + ([python_license] if python_license.is_file() else []):
        yield f"license:{path.name}", path.read_text(encoding="utf-8", errors="replace")


def _pydocs_documents() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise SpotlightError("the 'pydocs' corpus needs the standard library module pydoc_data") from None
    for name in sorted(topics):
        yield f"pydocs:{name}", topics[name]


@dataclass(frozen=True, slots=True)
class PackageCorpus:
    """Documents from the files of Debian packages: every listed file matching `include` and no `exclude`."""

    name: str
    about: str  # what the text is, one line
    packages: tuple[str, ...]  # dpkg names; a glob ("linux-doc-[0-9]*") takes the newest version installed
    install: str  # what `apt-get install` takes to bring them (a glob's unversioned meta-package)
    include: tuple[str, ...]  # fnmatch patterns on absolute paths ('*' crosses '/')
    exclude: tuple[str, ...] = ()
    skip_generated: bool = False  # drop generated code (tables, bindings): GENERATED in its first lines

    def files(self) -> list[Path]:
        """The matching files, sorted; raises SpotlightError naming what to install when a package is absent."""
        lists = {pattern: _package_list(pattern) for pattern in self.packages}
        missing = [pattern for pattern, found in lists.items() if found is None]
        if missing:
            raise SpotlightError(
                f"corpus {self.name!r} ({self.about}) needs the Debian package(s) {', '.join(missing)}: apt-get install {self.install}"
            )
        paths = set()
        for list_file in lists.values():
            for line in list_file.read_text(encoding="utf-8", errors="replace").splitlines():
                if any(fnmatch.fnmatchcase(line, p) for p in self.include) and not any(
                    fnmatch.fnmatchcase(line, p) for p in self.exclude
                ):
                    path = Path(line)
                    if path.is_file() and not path.is_symlink():
                        paths.add(path)
        if not paths:  # e.g. a minimal image whose dpkg config excludes /usr/share/doc (path-exclude)
            raise SpotlightError(
                f"corpus {self.name!r}: its packages ({', '.join(str(f) for f in lists.values())}) are installed but none of "
                f"their files matching {', '.join(self.include)} is on disk (check path-exclude in /etc/dpkg/dpkg.cfg.d)"
            )
        return sorted(paths)

    def documents(self) -> Iterator[Document]:
        for path in self.files():
            text = read_text(path)
            if not (self.skip_generated and GENERATED.search(text[:1000])):
                yield f"{self.name}:{path}", text


def _version_key(name: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _package_list(pattern: str) -> Path | None:
    """dpkg's file list of the installed package `pattern` (the newest version for a glob), or None."""
    found = list(DPKG_INFO.glob(f"{pattern}.list")) + list(DPKG_INFO.glob(f"{pattern}:*.list"))
    return max(found, key=lambda p: _version_key(p.name)) if found else None


PACKAGE_CORPORA = (
    PackageCorpus("linux-doc", "the Linux kernel's Documentation/ tree: reST and plain-text prose",
                  ("linux-doc-[0-9]*",), "linux-doc", ("*/Documentation/*.rst.gz", "*/Documentation/*.txt.gz")),
    PackageCorpus("python-docs", "the Python documentation's reST sources: tutorial, library, reference, HOWTOs",
                  (PYTHON_DOC,), PYTHON_DOC, ("*/html/_sources/*.rst.txt",)),
    PackageCorpus("debian-docs", "Debian's handbook (English), reference, policy and developers' reference",
                  ("debian-handbook", "debian-reference-en", "debian-policy", "developers-reference"),
                  "debian-handbook debian-reference-en debian-policy developers-reference",
                  ("/usr/share/doc/debian-handbook/html/en-US/*.html", "/usr/share/debian-reference/*.en.html",
                   "*/_sources/*.rst.txt")),
    PackageCorpus("manpages", "the Linux man-pages project: system calls, C library, files, overviews (troff)",
                  ("manpages", "manpages-dev"), "manpages manpages-dev", ("/usr/share/man/man*/*.gz",)),
    PackageCorpus("postgres-docs", "the PostgreSQL manual (HTML): SQL, administration, internals",
                  ("postgresql-doc-[0-9]*",), "postgresql-doc", ("*/html/*.html",)),
    PackageCorpus("perl-docs", "Perl's documentation (POD): language, tutorials, FAQ", ("perl-doc",), "perl-doc", ("*.pod",)),
    PackageCorpus("git-docs", "git's manual pages and guides (AsciiDoc sources)", ("git-doc",), "git-doc",
                  ("/usr/share/doc/git-doc/*.txt",)),
    PackageCorpus("go", "the Go toolchain's and standard library's source code, not generated", ("golang-1.*-src",), "golang-src",
                  ("*.go",), ("*/testdata/*",), skip_generated=True),
    PackageCorpus("rust", "the Rust standard library's and compiler's source code, not generated", ("rust-src",), "rust-src",
                  ("*.rs",), ("*/src/test/*", "*/tests/*"), skip_generated=True),
    PackageCorpus("elisp", "GNU Emacs's Lisp source code", ("emacs-el",), "emacs-el", ("*.el.gz",)),
)

BUILTIN: dict[str, Callable[[], Iterator[Document]]] = {
    "stdlib": _stdlib_documents, "kjv": _kjv_documents, "licenses": _license_documents, "pydocs": _pydocs_documents,
    **{corpus.name: corpus.documents for corpus in PACKAGE_CORPORA},
}
ABOUT = {
    "stdlib": "the Python standard library's .py sources: code",
    "kjv": "the King James Bible (bible-kjv-text): held out, never trained on",
    "licenses": "/usr/share/common-licenses and Python's LICENSE: legal prose",
    "pydocs": "the Python reference's topics (pydoc_data): technical prose",
    **{corpus.name: corpus.about for corpus in PACKAGE_CORPORA},
}
