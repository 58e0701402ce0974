"""A throwaway PKI for a local TLS broker: a CA, a server and a client certificate (openssl CLI).

Made for tests and demos, never for production: keys are unencrypted and live next to the
certificates. The server certificate names ``localhost`` and ``127.0.0.1``; a second, unrelated CA
(``other_ca_cert``) lets tests check that a client trusting the wrong CA is refused.

    python -m scripts.tls DIR      # writes the files into DIR and prints their paths
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ("PKI", "TLSError", "make_pki")

_DAYS = "30"
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_LEAF_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid,issuer\n"
)


class TLSError(RuntimeError):
    """openssl is missing or failed to make a key or certificate."""


@dataclass(frozen=True)
class PKI:
    """Paths of the PEM files `make_pki` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path

    @classmethod
    def in_dir(cls, directory: Path) -> PKI:
        d = Path(directory).resolve()
        return cls(
            ca_cert=d / "ca.pem",
            server_cert=d / "server.pem",
            server_key=d / "server.key",
            client_cert=d / "client.pem",
            client_key=d / "client.key",
            other_ca_cert=d / "other-ca.pem",
        )

    def exists(self) -> bool:
        return all(p.exists() for p in vars(self).values())


def _openssl(*args: str, cwd: Path) -> None:
    try:
        res = subprocess.run(
            ["openssl", *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
    except FileNotFoundError as e:
        raise TLSError("openssl is not installed (`apt-get install openssl`)") from e
    if res.returncode != 0:
        raise TLSError(f"`openssl {' '.join(args[:2])}` failed: {res.stderr.strip()}")


def _ca(d: Path, name: str, cn: str) -> None:
    _openssl(
        "req", "-x509", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", _DAYS,
        "-subj", f"/CN={cn}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d,
    )  # fmt: skip


def _leaf(d: Path, name: str, cn: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(_LEAF_EXT + ext)
    _openssl(
        "req", "-new", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={cn}", cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", _DAYS, "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


def make_pki(directory: Path) -> PKI:
    """Write a CA, a server certificate (localhost, 127.0.0.1), a client one and another CA.

    Files that are already there are kept (the same directory gives the same PKI).

    Raises:
        TLSError: openssl is missing or failed.
    """
    pki = PKI.in_dir(directory)
    if pki.exists():
        return pki
    d = pki.ca_cert.parent
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca", "aio-workq test CA")
    _leaf(
        d,
        "server",
        "localhost",
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    _leaf(d, "client", "aio-workq-client", "extendedKeyUsage=clientAuth\n")
    _ca(d, "other-ca", "aio-workq unrelated CA")
    for key in (pki.server_key, pki.client_key):
        key.chmod(0o600)
    return pki


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m scripts.tls DIR", file=sys.stderr)
        return 2
    try:
        pki = make_pki(Path(args[0]))
    except TLSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in vars(pki).items():
        print(f"{name} = {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
