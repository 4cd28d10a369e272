"""TLS for the Dask comm, from certificate files (``--tls-ca-file``, ``--tls-cert``, ``--tls-key``).

The options mean what the ``dask scheduler`` and ``dask worker`` options of the same names
mean: one CA that signed every party's certificate, and the certificate (and key) this
side presents. With them, the scheduler and workers of a LocalCluster started by blockals
listen on ``tls://`` and accept only peers whose certificate the CA signed, and the client
to a ``--scheduler tls://...`` presents the certificate. See ``docs/security.md``.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from distributed.security import Security

from blockals.errors import InputError

__all__ = ["TLSFiles"]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the CA that signed the cluster's certificates, and this side's certificate and key.

    Parameters
    ----------
    ca_file : str
        The CA certificate every peer's certificate must be signed by.
    cert : str
        The certificate presented by the client (and by a LocalCluster's scheduler and
        workers started here).
    key : str, optional
        Its private key; None when ``cert`` holds the key too.
    """

    ca_file: str
    cert: str
    key: str | None = None

    @classmethod
    def parse(cls, ca_file: str | None, cert: str | None, key: str | None) -> TLSFiles | None:
        """The files of the command-line options; None when none is given."""
        if not (ca_file or cert or key):
            return None
        if not (ca_file and cert):
            raise InputError("TLS needs both --tls-ca-file and --tls-cert (and --tls-key unless the certificate file holds the key).")
        for flag, value in (("--tls-ca-file", ca_file), ("--tls-cert", cert), ("--tls-key", key)):
            if value is not None and not os.path.isfile(value):
                raise InputError(f"{flag} {value} is not a file.")
        return cls(ca_file, cert, key)

    def security(self) -> Security:
        """A Security requiring TLS, with these files for the client, the scheduler and the workers."""
        pair = {"cert": self.cert, "key": self.key}
        security = Security(
            require_encryption=True,
            tls_ca_file=self.ca_file,
            **{f"tls_{role}_{part}": value for role in ("client", "scheduler", "worker") for part, value in pair.items()},
        )
        try:  # load the files now, so a bad one is named here rather than deep in a connection
            security.get_connection_args("client")
        except (ssl.SSLError, OSError) as exc:
            files = f"--tls-ca-file {self.ca_file}, --tls-cert {self.cert}" + (f", --tls-key {self.key}" if self.key else "")
            raise InputError(f"the TLS files ({files}) cannot be loaded: {exc}.") from None
        return security
