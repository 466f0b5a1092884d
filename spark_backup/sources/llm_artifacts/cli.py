"""The ``llm_artifacts`` kind's own command: ``spark-backup versions SOURCE``."""

from __future__ import annotations

import json

import click

from spark_backup.sources.holder import current_runtime

# ``--help`` imports this module; the kind loads when the command runs.


@click.command("versions")
@click.argument("source", required=False)
@click.option("--json", "as_json", is_flag=True, help="The versions as JSON.")
def versions(source: str | None, as_json: bool) -> None:
    """The versions of an llm_artifacts source, oldest first: id, digest, label, size and the
    bytes each one added to the store. Any one restores with `spark-backup restore ID`."""
    from spark_backup.console import printable, stdout
    from spark_backup.sources.base import source_of_kind
    from spark_backup.sources.llm_artifacts import KIND

    runtime = current_runtime()
    chosen = source_of_kind(runtime, KIND, source)
    rows = []
    for ref in runtime.copies(chosen.name):
        meta = ref.manifest.source_metadata
        rows.append(
            {
                "id": ref.manifest.id,
                "partition": ref.manifest.partition,
                "finished_at": ref.manifest.finished_at,
                "digest": meta.get("version_digest"),
                "label": meta.get("label"),
                "files": meta.get("files"),
                "bytes": meta.get("bytes"),
                "tensors": meta.get("tensors"),
                "added_bytes": meta.get("added_bytes"),
                "signature": ref.signature,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        stdout.print(
            f"{row['id']}  {str(row['digest'])[:16]}  {row['files']} files  {row['bytes']} B  "
            f"+{row['added_bytes']} B  {printable(str(row['label']))}",
            highlight=False,
        )
    if not rows:
        stdout.print(f"{chosen.name}: no versions yet", highlight=False)


COMMANDS = [versions]
