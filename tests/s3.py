"""A real S3 endpoint on loopback: moto's ThreadedMotoServer (what Ray's own tests use for S3).

The server runs in the test process; its buckets live in the process too, so stopping it and
starting it again on the same port (an outage) keeps what was stored.
"""

from __future__ import annotations

import os

# Dummy credentials for moto, which accepts any; the metadata endpoint is never asked.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "metaray-test-key", "AWS_SECRET_ACCESS_KEY": "metaray-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
BUCKET = "metaray"


class MotoS3:
    def __init__(self, ip: str) -> None:
        from moto.server import ThreadedMotoServer

        self.ip = ip
        self.server = ThreadedMotoServer(ip_address=ip, port=0, verbose=False)
        self.server.start()
        self.running = True
        self.port = self.server.get_host_and_port()[1]
        self.fs.create_dir(BUCKET)

    @property
    def endpoint(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def fs(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region="us-east-1",
                                 access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], allow_bucket_creation=True)

    def uri(self, key: str) -> str:
        """``s3://metaray/KEY`` on this endpoint, as a user passes it to metaray."""
        return f"s3://{BUCKET}/{key}?endpoint_override={self.endpoint}&scheme=http"

    def keys(self, prefix: str) -> dict[str, int]:
        """Object key (below ``prefix``) -> size."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
        return {i.path[len(BUCKET) + len(prefix) + 2:]: i.size for i in infos if i.type == pafs.FileType.File}

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def restart(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address=self.ip, port=self.port, verbose=False)
        self.server.start()
        self.running = True


def set_credentials() -> dict[str, str | None]:
    """Put the dummy credentials in this process's environment (CLI subprocesses inherit them);
    returns what to restore."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    return saved


def restore(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
