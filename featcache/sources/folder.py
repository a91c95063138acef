"""ImageFolder trees (``root/<class>/**/<image>``) walked without ever leaving the root.

A class folder must resolve inside the root, and no two class folders may resolve to the same files (they would
carry two labels). Inside a class folder, a symlink is followed only when its target lies in that class folder;
any other link (out of the root, into another class, broken), a loop, a second path to a folder or file already
listed, and every file that is not an image with one of :data:`IMG_EXTENSIONS` is ignored and listed with its
reason. Nothing outside the root is opened or listed: a link's target is resolved (``os.path.realpath``) and
compared as a path before anything is read through it.
"""
from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from ..errors import MissingFileError, SourceError
from .base import IMG_EXTENSIONS, ImageSource, SourceItem, file_reason, is_image, report_ignored, within

# Why an entry is not read (the reasons ``ImageSource.ignored`` lists and the log groups by).
OUTSIDE_ROOT = "symlink out of the data root, not followed"
OTHER_CLASS = "symlink out of its class folder (its images would carry another label), not followed"
LOOP = "symlink loop (it points at a folder that holds it)"
SECOND_PATH = "a second path (through a symlink) to a file or folder already listed"
BROKEN = "broken symlink"
HIDDEN = "hidden"
NOT_REGULAR = "not a regular file"


def scan_folder(root: str | os.PathLike) -> ImageSource:
    """An ImageFolder tree: one sub-directory per class (sorted, hidden skipped), images found recursively.

    Raises:
        MissingFileError: when ``root`` is not a directory.
        SourceError: no class folders, a class without images, or a class folder that resolves outside the root.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise MissingFileError(f"image folder {str(root)!r} does not exist")
    ignored: list[tuple[str, str]] = []
    classes = class_folders(str(root), ignored)
    items = []
    for label, cls in enumerate(tqdm(classes, desc="listing images", unit="class", disable=len(classes) < 100)):
        files = ClassWalk(str(root), cls, ignored).run()
        if not files:
            raise SourceError(f"class folder {str(root / cls)!r} holds no images with extensions {IMG_EXTENSIONS}"
                              + _ignored_hint(ignored, cls))
        items += [SourceItem(f, label) for f in files]
    report_ignored(str(root), ignored)
    return ImageSource("folder", root, classes, items, ignored)


def _ignored_hint(ignored: list[tuple[str, str]], cls: str) -> str:
    mine = [f"{path} ({reason})" for path, reason in ignored if path.startswith(cls + "/")]
    return f"; ignored: {', '.join(mine[:3])}" if mine else ""


def class_folders(root: str, ignored: list[tuple[str, str]]) -> list[str]:
    """The sorted class folder names under the resolved ``root``; other top-level entries go to ``ignored``."""
    classes = []
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                ignored.append((entry.name, HIDDEN))
            elif entry.is_dir():
                classes.append(entry.name)
            else:
                ignored.append((entry.name, "not a class folder (a file or broken link at the root)"))
    if not classes:
        raise SourceError(f"no class sub-directories in {root!r}; expected root/<class>/<image> (ImageNet train "
                          "layout) or WebDataset .tar shards with --data-format wds")
    check_class_links(root, classes)
    return classes


def check_class_links(root: str, classes: list[str]) -> None:
    """Every class folder resolves inside ``root``, and no class folder holds another's files."""
    real = {cls: os.path.realpath(os.path.join(root, cls)) for cls in classes}
    for cls, path in real.items():
        if path == root or not within(path, root):
            raise SourceError(f"class folder {os.path.join(root, cls)} is a symlink to {path}, outside the data root "
                              f"{root}; featcache reads only files under the root: copy or move it in, or point "
                              "--data at a root that holds it")
    ordered = sorted(real, key=lambda c: real[c] + os.sep)  # a folder sorts right before the folders inside it
    for a, b in zip(ordered, ordered[1:]):
        if within(real[b], real[a]):
            raise SourceError(f"class folders {a!r} and {b!r} resolve to {real[a]} and {real[b]} (through a symlink): "
                              "the same images would carry two labels; remove the link")


class ClassWalk:
    """The images of one class folder, following symlinks only where they stay inside it.

    The real folders are walked first and links after them, so a file or folder reached both ways is listed
    under its real path. Every entry not used is appended to ``ignored`` as ``(relpath, reason)``. Folders and
    files are keyed by their real path, so a loop or a second path to the same folder or file is seen and
    listed, never walked twice.
    """

    def __init__(self, root: str, cls: str, ignored: list[tuple[str, str]]):
        self.root, self.cls, self.ignored = root, cls, ignored
        self.top = os.path.realpath(os.path.join(root, cls))
        self.dirs: dict[str, str] = {self.top: cls}  # real path -> the relpath it was listed under
        self.files: dict[str, str] = {}
        self.links: list[tuple[str, str]] = []  # (relpath, path) of links met and not yet followed

    def run(self) -> list[str]:
        """The class's image relpaths (``<class>/<sub>/<file>``, POSIX), sorted."""
        self.walk([(self.cls, self.top)])
        while self.links:
            links, self.links = self.links, []
            self.walk([d for d in (self.follow(rel, path) for rel, path in links) if d is not None])
        return sorted(self.files.values())

    def walk(self, stack: list[tuple[str, str]]) -> None:
        """Depth-first over ``(relpath, real path)`` folders, in name order."""
        stack = stack[::-1]
        while stack:
            stack.extend(reversed(self.visit(*stack.pop())))

    def visit(self, rel_dir: str, real_dir: str) -> list[tuple[str, str]]:
        """List one real folder: record its files, keep its links for later, return its sub-folders to walk."""
        subdirs = []
        with os.scandir(real_dir) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{rel_dir}/{entry.name}"
                if entry.is_symlink():
                    self.links.append((rel, entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    if self.claim(self.dirs, entry.path, rel):
                        subdirs.append((rel, entry.path))
                else:
                    self.add_file(rel, entry.path, entry.is_file(follow_symlinks=False))
        return subdirs

    def follow(self, rel: str, path: str) -> tuple[str, str] | None:
        """A link: the new folder it leads to, or None once its file target or the reason to ignore it is recorded."""
        real = os.path.realpath(path)
        reason = self.leaves(real)
        if reason:
            self.ignored.append((rel, reason))
        elif os.path.isdir(real):
            return (rel, real) if self.claim(self.dirs, real, rel) else None
        else:
            self.add_file(rel, real, os.path.isfile(real))
        return None

    def leaves(self, real: str) -> str:
        """Why a link to ``real`` is not followed ("" when it stays in the class folder and exists)."""
        if not within(real, self.top):
            return OTHER_CLASS if within(real, self.root) else OUTSIDE_ROOT
        return "" if os.path.exists(real) else BROKEN

    def add_file(self, rel: str, real: str, regular: bool) -> None:
        """Keep an image file (not hidden, a known extension, first path to it); record why anything else is not."""
        name = rel.rpartition("/")[2]
        if not regular:
            self.ignored.append((rel, NOT_REGULAR))
        elif name.startswith("."):
            self.ignored.append((rel, HIDDEN))
        elif not is_image(name):
            self.ignored.append((rel, file_reason(name)))
        else:
            self.claim(self.files, real, rel)

    def claim(self, seen: dict[str, str], real: str, rel: str) -> bool:
        """Record ``rel`` as the path of ``real``; False (recorded as ignored) if it was already reached."""
        first = seen.get(real)
        if first is None:
            seen[real] = rel
            return True
        self.ignored.append((rel, LOOP if rel.startswith(first + "/") else SECOND_PATH))
        return False
