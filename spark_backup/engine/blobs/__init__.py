"""The content-addressed blob layer: deduplicated versions of large files (model weights,
vector indexes), shared by every kind that wants it. No Dagster, no plan, no kind.

- ``keys.py``: chunk ids, a keyed MAC of each chunk's plaintext sha256;
- ``safetensors.py``: the safetensors header, parsed and checked (tensor boundaries);
- ``chunker.py``: content-defined chunking (FastCDC, 64 KiB average), cut at given boundaries;
- ``chunks.py``: chunk references, and the first release's one-object-per-chunk layout (read only);
- ``packs.py``: packs (many chunks' zstd frames in one age object), their indexes, written and read;
- ``version.py``: a version's document (files -> chunks, per-file sha256), written and read;
- ``sweep.py``: mark and sweep of packs no committed version needs.

The design (chunk size, keying, layout, prune, the crash table) is in docs/architecture.md,
"Deduplicated versions".
"""
