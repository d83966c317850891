"""Backup pieces that need no database: reading a mysqldump file, the credentials file,
which checkpoint files go into an archive, archive names."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import make_url

from echo_auth.ops.backup import _select_checkpoints
from echo_auth.ops.backup_format import archive_name, list_archives
from echo_auth.ops.backup_mysql import defaults_file, scan_dump, strip_definer

HEAD = "ab" * 32
CREATE = """CREATE TABLE `chain_head` (
  `id` int(11) NOT NULL,
  `seq` bigint(20) NOT NULL,
  `hash` char(64) NOT NULL,
  `updated_at` datetime(6) NOT NULL,
  PRIMARY KEY (`id`)
) ENGINE=InnoDB;
CREATE TABLE `we``ird` (
  `a` text,
  `b` blob
) ENGINE=InnoDB;
CREATE TABLE `empty` (
  `a` int
) ENGINE=InnoDB;
"""
# Strings that hold what a naive counter would trip on: parentheses, "),(", quotes,
# backslashes, a semicolon at the end of a line's text.
TRICKY = [
    r"'x),(y'",
    r"'it\'s (odd)'",
    r"'back\\'",
    r"'ends;'",
    "NULL",
]


def _dump(tmp_path: Path, row_per_line: bool) -> Path:
    rows = [f"({value},0x28290A)" for value in TRICKY]
    if row_per_line:
        weird = "INSERT INTO `we``ird` VALUES\n" + ",\n".join(rows) + ";\n"
        head = f"INSERT INTO `chain_head` VALUES\n(1,41,'{HEAD}','2026-01-01 00:00:00.000000');\n"
    else:
        weird = "INSERT INTO `we``ird` VALUES " + ",".join(rows) + ";\n"
        head = f"INSERT INTO `chain_head` VALUES (1,41,'{HEAD}','2026-01-01 00:00:00.000000');\n"
    path = tmp_path / f"dump-{row_per_line}.sql"
    path.write_text(CREATE + head + weird + weird)
    return path


def test_scan_dump_counts_rows_in_both_insert_layouts(tmp_path: Path) -> None:
    for row_per_line in (True, False):
        counts, first = scan_dump(_dump(tmp_path, row_per_line))
        assert counts == {"chain_head": 1, "we`ird": 2 * len(TRICKY), "empty": 0}
        assert first["chain_head"]["seq"] == b"41"
        assert first["chain_head"]["hash"] == f"'{HEAD}'".encode()


def test_defaults_file_is_private_quoted_and_removed() -> None:
    url = make_url("mysql+pymysql://owner:p%23a%22ss%5Cw@db.example:3307/echo")
    with defaults_file(url) as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        text = path.read_text()
    assert not path.exists()
    assert 'password="p#a"ss\\\\w"' in text
    assert 'host="db.example"' in text and "port=3307" in text


def test_restored_triggers_take_the_restoring_account() -> None:
    line = (
        b"/*!50003 CREATE*/ /*!50017 DEFINER=`root`@`127.0.0.1`*/ /*!50003 TRIGGER t "
        b"BEFORE UPDATE ON audit_events FOR EACH ROW SIGNAL SQLSTATE '45000' */;;\n"
    )
    assert strip_definer(line) == (
        b"/*!50003 CREATE*/ /*!50003 TRIGGER t BEFORE UPDATE ON audit_events FOR EACH ROW "
        b"SIGNAL SQLSTATE '45000' */;;\n"
    )
    data = b"INSERT INTO `t` VALUES ('/*!50017 DEFINER=`a`@`b`*/');\n"
    assert strip_definer(data) == data


def _checkpoint(directory: Path, seq: int, signed_at: datetime) -> bytes:
    stem = f"{seq:012d}-{signed_at:%Y%m%dT%H%M%S%fZ}"
    statement = json.dumps(
        {"seq": seq, "signed_at": signed_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    ).encode()
    (directory / f"{stem}.json").write_bytes(statement)
    (directory / f"{stem}.sig").write_bytes(b"s" * 64)
    return statement


def test_checkpoints_newer_than_the_dump_are_left_out(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    in_dump = _checkpoint(tmp_path, 10, now - timedelta(hours=1))
    _checkpoint(tmp_path, 12, now)  # signed after the dump began, not in it
    _checkpoint(tmp_path, 99, now - timedelta(days=1))  # old, not in the dump: evidence
    chosen, left_out = _select_checkpoints(tmp_path, {in_dump}, now - timedelta(minutes=2))
    names = [p.name for p in chosen]
    assert left_out == 1
    assert len(names) == 4 and not any(n.startswith("000000000012") for n in names)
    assert any(n.startswith("000000000099") and n.endswith(".sig") for n in names)


def test_archives_are_named_and_listed_newest_first(tmp_path: Path) -> None:
    moment = datetime(2026, 11, 27, 17, 30, 5, tzinfo=UTC)
    assert archive_name(moment, encrypted=False) == "echo-backup-20261127T173005Z.tar.gz"
    assert archive_name(moment, encrypted=True).endswith(".tar.gz.age")
    for name in (
        "echo-backup-20261127T173005Z.tar.gz",
        "echo-backup-20261128T000000Z.tar.gz.age",
        "echo-backup-nonsense.tar.gz",
        ".echo-backup-20261129T000000Z.tar.gz.partial",
    ):
        (tmp_path / name).write_bytes(b"x")
    found = list_archives(tmp_path)
    assert [a.name for a in found] == [
        "echo-backup-20261128T000000Z.tar.gz.age",
        "echo-backup-20261127T173005Z.tar.gz",
    ]
    assert found[0].encrypted and not found[1].encrypted
