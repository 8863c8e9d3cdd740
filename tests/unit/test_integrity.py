"""Page checksums written and verified (common/lake/integrity.py); whole-object writes with the
store's checksum (common/lake/uploads.py), the parts that need no server."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.io.pyarrow import PyArrowFileIO

from common.errors import CorruptDataFileError
from common.lake.integrity import (
    VerifiedFileIO,
    _page_header_has_crc,
    has_page_checksums,
    read_column_by_row_group,
    read_object,
    verified,
    verify_parquet,
)
from common.lake.retry import is_transient
from common.lake.uploads import ObjectWriter, crc32c_b64
from tests.support.corruption import flip_byte_in_data_page

pytestmark = pytest.mark.unit

ROWS = pa.table(
    {
        "id": [f"id-{n}" for n in range(300)],
        "raw_event": [f'{{"id": "id-{n}", "data": "{"x" * 30}"}}' for n in range(300)],
    }
)


def write(path: Path, *, checksums: bool = True, dictionary: bool = False) -> Path:
    pq.write_table(
        ROWS,
        path,
        compression="zstd",
        use_dictionary=dictionary,
        write_page_checksum=checksums,
        row_group_size=100,
    )
    return path


def buffer(path: Path) -> pa.Buffer:
    return pa.py_buffer(path.read_bytes())


def test_a_healthy_file_verifies_and_says_it_has_checksums(tmp_path: Path) -> None:
    path = write(tmp_path / "a.parquet")
    data = buffer(path)
    assert verify_parquet(data, str(path)) == 300
    assert has_page_checksums(data, pq.read_metadata(path))
    with_dictionary = write(tmp_path / "d.parquet", dictionary=True)
    assert has_page_checksums(buffer(with_dictionary), pq.read_metadata(with_dictionary))
    without = write(tmp_path / "n.parquet", checksums=False)
    assert not has_page_checksums(buffer(without), pq.read_metadata(without))


def test_a_flipped_byte_reads_wrong_unverified_and_fails_verified(tmp_path: Path) -> None:
    # Given a file with one byte changed inside the raw_event page of its second row group
    path = write(tmp_path / "a.parquet")
    flip_byte_in_data_page(path, "raw_event", row_group=1)
    # Then an unverified read returns other values without an error (the danger) ...
    assert not pq.read_table(path).equals(ROWS)
    # ... and a verified read names the row group, the column and the CRC
    with pytest.raises(CorruptDataFileError) as raised:
        verify_parquet(buffer(path), str(path))
    assert raised.value.path == str(path)
    assert raised.value.detail.startswith("row group 1: column raw_event: OSError")
    assert "CRC checksum verification failed" in raised.value.detail
    # And column by column, the other row groups still read
    reads = read_column_by_row_group(buffer(path), str(path), "raw_event")
    assert [r.error is None for r in reads] == [True, False, True]
    assert reads[1].rows == 100 and reads[1].values is None
    assert (
        reads[2].values is not None
        and reads[2].values.to_pylist() == (ROWS.column("raw_event").to_pylist()[200:])
    )


def test_a_file_that_is_not_parquet_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(CorruptDataFileError, match="unreadable Parquet footer"):
        verify_parquet(buffer(path), str(path))


def test_the_verified_fileio_checks_parquet_and_passes_the_rest_through(tmp_path: Path) -> None:
    io = VerifiedFileIO(PyArrowFileIO())
    good = write(tmp_path / "good.parquet")
    other = tmp_path / "m.avro"
    other.write_bytes(b"manifest bytes")
    with io.new_input(good.as_uri()).open() as stream:
        assert pq.read_table(stream).equals(ROWS)
    assert len(io.new_input(good.as_uri())) == good.stat().st_size
    assert io.new_input(good.as_uri()).exists()
    assert io.new_input(other.as_uri()).open().read() == b"manifest bytes"
    bad = write(tmp_path / "bad.parquet")
    flip_byte_in_data_page(bad, "id")
    with pytest.raises(CorruptDataFileError, match="column id"):
        io.new_input(bad.as_uri()).open()
    with io.new_output((tmp_path / "out.bin").as_uri()).create() as stream:
        stream.write(b"out")
    io.delete((tmp_path / "out.bin").as_uri())
    assert not (tmp_path / "out.bin").exists()
    assert read_object(io, other.as_uri()).to_pybytes() == b"manifest bytes"


def test_verified_wraps_a_table_once(tmp_path: Path) -> None:
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog(
        "v", type="sql", uri=f"sqlite:///{tmp_path}/c.db", warehouse=tmp_path.as_uri()
    )
    catalog.create_namespace("n")
    table = catalog.create_table(("n", "t"), schema=ROWS.schema)
    table.append(ROWS)
    wrapped = verified(table)
    assert isinstance(wrapped.io, VerifiedFileIO) and verified(wrapped) is wrapped
    assert wrapped.scan().to_arrow().num_rows == 300


@pytest.mark.parametrize(
    ("header", "has_crc"),
    [
        (bytes([0x15, 0x00, 0x15, 0x02, 0x15, 0x02, 0x15, 0x08]), True),
        (bytes([0x15, 0x00, 0x15, 0x02, 0x15, 0x02, 0x2C]), False),  # field 5 follows
        (bytes([0x15, 0x00, 0x00]), False),  # the struct ends
        (bytes([0x05, 0x08]), False),  # long-form field ids: not a header pyarrow writes
        (bytes([0x18]), False),  # field 1 not an int
        (bytes([0x15, 0xFF, 0xFF]), False),  # cut short
    ],
)
def test_page_header_crc_detection(header: bytes, has_crc: bool) -> None:
    assert _page_header_has_crc(header) is has_crc


def test_crc32c_as_s3_spells_it() -> None:
    # the check value of CRC-32C ("123456789" -> 0xE3069283), base64 of its big-endian bytes
    assert crc32c_b64(b"123456789") == "4waSgw=="


def test_local_paths_are_written_through_the_fileio(tmp_path: Path) -> None:
    objects = ObjectWriter()
    target = tmp_path / "obj.bin"
    assert not objects.uses_checksum(PyArrowFileIO(), target.as_uri())
    objects.write(PyArrowFileIO(), target.as_uri(), pa.py_buffer(b"bytes"))
    assert target.read_bytes() == b"bytes"
    with pytest.raises(ValueError, match="crc32c, off"):
        ObjectWriter("md5")


def test_s3_settings_the_checksummed_upload_cannot_honour_fall_back_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    objects = ObjectWriter()
    signed = PyArrowFileIO({"s3.signer": "S3V4RestSigner"})
    with caplog.at_level(logging.WARNING, logger="common.lake.uploads"):
        assert not objects.uses_checksum(signed, "s3://bucket/key.parquet")
        assert not objects.uses_checksum(signed, "s3://bucket/other.parquet")
    assert [r.getMessage() for r in caplog.records] == [
        "uploading through the table's FileIO without an additional checksum: icefleet's "
        "checksummed upload does not support s3.signer"
    ]
    assert objects.uses_checksum(PyArrowFileIO({}), "s3a://bucket/key.parquet")
    assert not ObjectWriter("off").uses_checksum(PyArrowFileIO({}), "s3://bucket/key.parquet")


def test_a_checksum_the_store_refuses_is_worth_sending_again() -> None:
    from botocore.exceptions import ClientError

    for code in ("BadDigest", "XAmzContentChecksumMismatch"):
        error = ClientError({"Error": {"Code": code}, "ResponseMetadata": {}}, "PutObject")
        assert is_transient(error)
