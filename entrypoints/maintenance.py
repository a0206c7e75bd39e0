"""`marquee migrate | backup | restore`: the commands that change the stores as a whole
(Alembic, pyarrow and chDB load here, not for every `marquee` command)."""

from __future__ import annotations

import argparse
import json

from core.config import Settings
from core.migrate import upgrade
from entrypoints import backup as backups
from services.history import open_store


def migrate(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.database_url:
        raise SystemExit("marquee migrate: MARQUEE_DATABASE_URL is not set")
    upgrade(settings.database_url, args.revision)
    print(f"database migrated to {args.revision}")
    # The history store's own versioned migrations (chDB under data_dir, or the server by URL).
    store = open_store(settings.clickhouse_url, settings.chdb_path, settings.history_retention_days)
    try:
        store.ensure_schema()
    finally:
        store.close()
    print(f"history store migrated ({'ClickHouse server' if settings.clickhouse_url else settings.chdb_path})")
    return 0


def backup(settings: Settings, args: argparse.Namespace) -> int:
    try:
        manifest = backups.backup(settings, args.directory)
    except backups.BackupError as err:
        raise SystemExit(f"marquee backup: {err}") from err
    print(json.dumps(manifest, indent=2))
    print(f"backed up to {args.directory} in {manifest['seconds']:.1f} s")
    return 0


def restore(settings: Settings, args: argparse.Namespace) -> int:
    try:
        manifest = backups.read_manifest(args.directory)
        targets = [f"PostgreSQL database {backups.target_database(settings)}", backups.target_history(settings)]
        if "temporal" in manifest and not settings.temporal_address:
            targets.append(f"Temporal dev server file {settings.data_dir / 'temporal.db'}")
        print(f"restoring the backup of {manifest['created_at']} into: {'; '.join(targets)}", flush=True)
        report = backups.restore(settings, args.directory, force=args.force)
    except backups.BackupError as err:
        raise SystemExit(f"marquee restore: {err}") from err
    print(json.dumps(report, indent=2))
    print(f"restored from {args.directory} in {report['seconds']:.1f} s")
    return 0
