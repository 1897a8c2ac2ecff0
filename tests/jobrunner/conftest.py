import pyarrow.fs as pafs
import pytest
from jr_helpers import BUCKET, make_rows, seed


@pytest.fixture(scope="session")
def rows():
    return make_rows()


@pytest.fixture(scope="session")
def source(snowflake, rows):
    """fakesnow seeded with base.assets.erc20_token_transfers."""
    with snowflake.connect() as conn:
        seed(conn, rows)
    return snowflake


@pytest.fixture(scope="session")
def bucket(gcs):
    fs = pafs.GcsFileSystem(
        anonymous=True, endpoint_override=gcs.endpoints()["host_port"], scheme="http", project_id="beam-test"
    )
    fs.create_dir(BUCKET)
    return BUCKET
