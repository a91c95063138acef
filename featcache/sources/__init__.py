"""Image sources (an ImageFolder tree, WebDataset image shards, local or by URL, or a Hugging Face dataset) and seeded
few-shot subsets.

An `ImageSource` is a list of `SourceItem` (relpath, label) under a root, plus a loader returning RGB
uint8 [3, H, W] tensors. It is picklable and opens nothing until `load` is called, so DataLoader workers
each open their own files. Discovery accounts for every entry it does not use: ``source.ignored`` lists
``(path, reason)`` pairs, and a one-line summary per reason is logged (logger ``featcache.sources``).

``folder``: ``root/<class>/**/<image>`` (ImageNet train layout). Classes are the sorted sub-directory names
(hidden ones skipped), label = class index, files sorted per class, extensions :data:`IMG_EXTENSIONS` (any
case; torchvision's ImageFolder set). relpath = ``<class>/<file>``. The walk never leaves the root: a symlink
is followed only when its target lies inside its own class folder; links out of the root or into another class,
loops and second paths to one file or folder are ignored and listed, and a class folder that resolves outside
the root is an error. Loading re-checks that the file resolves inside the root.

``wds``: uncompressed tar shards holding ``<key>.<image ext>`` + ``<key>.cls`` (an ASCII integer), given
as a directory (its ``*.tar`` files, sorted), a brace pattern (``shards/train-{000000..000099}.tar``) or a
list. relpath = ``<shard path relative to root>#<member name>``. Labels are the ``.cls`` integers, kept
as they are; class names come from ``classes.txt`` (one per line) or ``classes.json`` (a list) beside the
shards, else ``"0" .. "<max label>"``. Random access reads a member's bytes at its offset; the offset index
comes from the tar headers (read once per process, lazily), which are all checked: a truncated shard, data after
the end-of-archive marker or a compressed shard (``.tar.gz``, or gzip bytes named ``.tar``) is an error naming
the shard; link members and members that are neither an image nor a label are ignored and listed. webdataset's
decoders are not used (they unpickle); members are decoded by Pillow like folder images.

``wds`` by URL: a spec whose entries (after brace expansion) include ``pipe:CMD``, ``http(s)://``, ``s3://`` or
``gs://`` shards is first staged: each shard is copied once into a local directory (``--data-stage-dir``, by
default ``<out>.shards`` beside a local cache; temp file + rename, its SHA-256 kept beside it so a rerun skips it)
and read there as local shards. The manifest records every shard's URL, staged name, size and SHA-256
(``data.staged``). Stage 2 never runs a command or opens a URL from a manifest: it checks the staged copies'
hashes, and when they are gone asks for the spec again (``--data SPEC``), which it stages anew. Other schemes are
refused by name; a compressed shard URL is refused with the ``pipe:`` command that decompresses it while staging.

``hf``: a Hugging Face ``datasets`` directory written by ``save_to_disk`` (one split: a DatasetDict root names its
splits) or parquet files (a file, a glob, or a directory of ``*.parquet``), with an image column (the ``Image``
feature's embedded bytes, or a binary column; ``--data-image-column``) and an integer label column (ClassLabel
names become the classes; ``--data-label-column``). relpath = ``<file relative to root>#<row>``. The manifest
records the columns and every file's size and row count (``data.hf``), checked when stage 2 re-opens the
dataset. Rows are read with pyarrow: arrow files memory-mapped, parquet a row group at a time; nothing is
unpickled, and ``datasets``' own image decoding (which opens paths named in the data) is not used.

Decoding: 16-bit images (Pillow modes ``I;16*``, 16-bit PGM) are scaled to 8 bits as ``round(v * 255 / 65535)``;
32-bit integer and float images, whose value range is unknown, are refused.
"""
from ..errors import DecodeError as ImageDecodeError
from .base import IMG_EXTENSIONS, KINDS, ImageSource, SourceItem
from .decode import decode_image
from .discover import detect_kind, open_local_source, open_source
from .folder import scan_folder
from .hf import scan_hf
from .recorded import source_from_manifest, source_manifest_entry
from .subsets import file_list_sha256, select_subset
from .urls import is_url_spec, scan_staged
from .wds import scan_wds

__all__ = ["IMG_EXTENSIONS", "KINDS", "ImageDecodeError", "ImageSource", "SourceItem", "decode_image", "detect_kind",
           "file_list_sha256", "is_url_spec", "open_local_source", "open_source", "scan_folder", "scan_hf", "scan_staged", "scan_wds",
           "select_subset", "source_from_manifest", "source_manifest_entry"]
