"""The benchmark's TLS certificate: ECDSA P-256, made at run time with trustme.

Untrusted input: none. A throwaway CA signs one certificate for 127.0.0.1 and localhost;
the files go in the benchmark's work folder and go away with it. Every TLS server in the
benchmark uses this one certificate, so every handshake costs the same signature (ECDSA
P-256, the cheapest in common use) and the same key exchange.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class CertFiles:
    cert: Path  # the certificate (PEM)
    key: Path  # its private key (PEM)
    chain: Path  # key then certificate in one file, as Postfix's smtpd_tls_chain_files takes


def make_certificate(folder: Path) -> CertFiles:
    import trustme  # the test extra; only the TLS scenarios need it

    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    leaf = ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.ECDSA)
    folder.mkdir(parents=True, exist_ok=True)
    files = CertFiles(folder / "cert.pem", folder / "key.pem", folder / "chain.pem")
    leaf.cert_chain_pems[0].write_to_path(str(files.cert))
    leaf.private_key_pem.write_to_path(str(files.key))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(files.chain))
    for path in (files.key, files.chain):
        os.chmod(path, 0o600)
    return files
