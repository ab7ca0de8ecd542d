"""The consortium PKI: a CA, the aggregator's TLS and lineage-signing certificates, a certificate per site, a CRL.

Everything lives in one consortium folder (default ``certs/``)::

    ca.pem, ca.key                consortium CA (the key stays on the CA machine)
    crl.pem                       revoked serials, signed by the CA
    aggregator.pem, aggregator.key  the Fleet endpoint's server certificate (serverAuth only)
    lineage.pem, lineage.key      the aggregator's lineage-signing certificate (only the
                                  `LINEAGE_SIGNING_OID` extended key usage): the one key that
                                  signs the lineage ledger
    sites/<SITE_ID>.pem, .key     one client certificate per site (clientAuth only, CN = site id)
    index.json                    every certificate ever issued, with its revocation

Keys are EC P-256, written as unencrypted PKCS8 PEM with mode 0600 from creation: the
file permissions, not a passphrase, protect them. Every file is written to a temporary
name, fsynced and renamed (`fedgen.atomic`), so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgen import atomic

from .errors import FedgenError

CA_DAYS = 365 * 5
CERT_DAYS = 90
CRL_DAYS = 30
DEFAULT_DIR = Path("certs")
# notBefore and the CRL's lastUpdate are backdated so that a machine whose clock runs a
# little behind the CA's still accepts a certificate or CRL made a moment ago.
CLOCK_SKEW = timedelta(minutes=5)
SITE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# certificate_hold (no un-hold here) and remove_from_crl (delta CRLs only) are left out.
REVOCATION_REASONS = (
    "unspecified",
    "key_compromise",
    "affiliation_changed",
    "superseded",
    "cessation_of_operation",
    "privilege_withdrawn",
)
INDEX_FORMAT = 1
# "fedgen lineage signing": the extended key usage only the lineage-signing certificate has.
# A private OID under the UUID arc 2.25 (ITU-T X.667), which needs no registration.
LINEAGE_SIGNING_OID = x509.ObjectIdentifier("2.25.58892349753908600560531645942087190838")
LINEAGE_SIGNER_CN = "aggregator lineage signer"

StrPath = str | os.PathLike[str]

_HOST_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*")
_DIGEST_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 50  # "<name> consortium CA" must fit the 64 characters X.509 allows a CN
_INDEX_FIELDS = ("kind", "subject", "serial", "not_before", "not_after", "fingerprint", "path", "revoked_at", "reason")


class PKIError(FedgenError, ValueError):
    """A PKI problem the user can fix; the message names the file or field and the fix."""


@dataclass(frozen=True)
class ConsortiumLayout:
    """Where each file of a consortium folder lives."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def crl(self) -> Path:
        return self.folder / "crl.pem"

    @property
    def aggregator_cert(self) -> Path:
        return self.folder / "aggregator.pem"

    @property
    def aggregator_key(self) -> Path:
        return self.folder / "aggregator.key"

    @property
    def lineage_cert(self) -> Path:
        return self.folder / "lineage.pem"

    @property
    def lineage_key(self) -> Path:
        return self.folder / "lineage.key"

    @property
    def sites(self) -> Path:
        return self.folder / "sites"

    @property
    def index(self) -> Path:
        return self.folder / "index.json"

    def site_cert(self, site_id: str) -> Path:
        return self.sites / f"{validate_site_id(site_id)}.pem"

    def site_key(self, site_id: str) -> Path:
        return self.sites / f"{validate_site_id(site_id)}.key"

    def relative(self, path: Path) -> str:
        """``path`` as index.json records it: relative to the folder, with forward slashes."""
        return path.relative_to(self.folder).as_posix()


@dataclass(frozen=True)
class CertInfo:
    """One certificate as index.json records it, cross-checked against the files.

    ``problem`` is None when the certificate file, its key (where present), the CRL and
    the index agree; otherwise it says what disagrees. ``not_after`` is None only for an
    unreadable file that the index does not list.
    """

    kind: str
    subject: str
    serial: str
    not_after: datetime | None
    fingerprint: str
    revoked: bool
    path: str
    revoked_at: datetime | None = None
    reason: str | None = None
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields, times as ISO 8601 strings."""
        fields = asdict(self)
        for name in ("not_after", "revoked_at"):
            fields[name] = fields[name].isoformat() if fields[name] else None
        return fields


def layout(folder: StrPath = DEFAULT_DIR) -> ConsortiumLayout:
    """The file layout of the consortium folder ``folder``."""
    return ConsortiumLayout(Path(folder))


# ---------------------------------------------------------------------------- validation


def validate_site_id(site_id: str) -> str:
    """Return ``site_id`` if it is a valid site id (it becomes a CN and a file name).

    Raises
    ------
    PKIError
        If it does not match ``SITE_ID_PATTERN``.
    """
    if not isinstance(site_id, str) or not SITE_ID_PATTERN.fullmatch(site_id):
        raise PKIError(
            f"site id {site_id!r} is not valid: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return site_id


def _validate_hosts(hosts: list[str]) -> list[str]:
    unique = list(dict.fromkeys(hosts))
    if not unique:
        raise PKIError("the aggregator needs at least one host name or IP address (--host)")
    for host in unique:
        if not host or any(c.isspace() for c in host):
            raise PKIError(
                f"host {host!r} is empty or contains spaces; give names like "
                "aggregator.example.org or 10.0.0.5, separated by commas"
            )
        if not _is_ip(host) and not _HOSTNAME.fullmatch(host):
            raise PKIError(f"host {host!r} is neither a DNS name nor an IP address")
    if len(unique[0]) > 64:
        raise PKIError(f"host {unique[0]!r} is longer than the 64 characters a CN allows; list a shorter name first")
    return unique


def _validate_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PKIError(f"--days must be a whole number of days, at least 1 (got {days!r})")
    return days


def _reason_name(reason: str) -> str:
    # Accept the CLI's key-compromise, the index's key_compromise and RFC 5280's keyCompromise.
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", reason.strip()).replace("-", "_").lower()
    if name not in REVOCATION_REASONS:
        choices = ", ".join(r.replace("_", "-") for r in REVOCATION_REASONS)
        raise PKIError(f"unknown revocation reason {reason!r}; use one of: {choices}")
    return name


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _utc(moment: datetime | None) -> datetime:
    if moment is None:
        moment = datetime.now(timezone.utc)
    elif moment.tzinfo is None:
        raise PKIError("times must be timezone-aware (UTC); got a naive datetime")
    # X.509 times have whole seconds: drop the rest so the index matches the certificate.
    return moment.astimezone(timezone.utc).replace(microsecond=0)


# ---------------------------------------------------------------------------- files


def _refuse_overwrite(paths: list[Path], force: bool, hint: str = "") -> None:
    if force:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise PKIError(f"{path} already exists; use --force to replace it{hint}")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic.write_bytes(path, pem, 0o600)


def load_certificate(path: StrPath) -> x509.Certificate:
    """Read a PEM certificate (the first one if the file holds several).

    Raises
    ------
    PKIError
        If the file is missing or is not a PEM certificate.
    """
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise PKIError(f"{path} not found; issue it with `fedgen certs` or fix the path") from None
    except (OSError, ValueError) as exc:
        raise PKIError(f"{path} is not a readable PEM certificate ({exc})") from None


def load_private_key(path: StrPath) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted PEM EC private key.

    Raises
    ------
    PKIError
        If the file is missing, encrypted, not a PEM key, or not an EC key.
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise PKIError(
            f"{path} not found; a private key stays on the machine it belongs to, "
            "so check that you are on the right one"
        ) from None
    except TypeError:
        raise PKIError(
            f"{path} is encrypted; fedgen expects an unencrypted PKCS8 key protected by its file mode (0600)"
        ) from None
    except (OSError, ValueError) as exc:
        raise PKIError(f"{path} is not a readable PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path} is not an EC key; fedgen certificates use EC P-256 keys")
    return key


def load_crl(path: StrPath) -> x509.CertificateRevocationList:
    """Read a PEM certificate revocation list (its signature is checked by `check_crl`).

    Raises
    ------
    PKIError
        If the file is missing or is not a PEM CRL.
    """
    try:
        return x509.load_pem_x509_crl(Path(path).read_bytes())
    except FileNotFoundError:
        raise PKIError(
            f"{path} not found; write it with `fedgen certs refresh-crl` on the CA machine "
            "and copy it next to the aggregator's certificate"
        ) from None
    except (OSError, ValueError) as exc:
        raise PKIError(f"{path} is not a readable PEM CRL ({exc})") from None


# ---------------------------------------------------------------------------- checks


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, as lowercase hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def certificate_matches_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    """True if ``key`` is the private half of the certificate's public key."""

    def spki(public_key: Any) -> bytes:
        return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    return spki(cert.public_key()) == spki(key.public_key())


def check_key_pair(cert_path: StrPath, key_path: StrPath) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load a certificate and its private key and make sure they belong together.

    Returns
    -------
    tuple
        The certificate and the key.

    Raises
    ------
    PKIError
        If either file cannot be read, or the key is not the certificate's.
    """
    cert, key = load_certificate(cert_path), load_private_key(key_path)
    if not certificate_matches_key(cert, key):
        raise PKIError(
            f"{cert_path} does not match its key {key_path}: the pair was mixed up or one "
            "of them was replaced; restore the pair or re-issue it with --force"
        )
    return cert, key


def check_key_file_mode(key_path: StrPath) -> None:
    """Refuse a private key file that its group or other users may read or write.

    Raises
    ------
    PKIError
        Naming the file, its mode and the ``chmod`` that fixes it.
    """
    if os.name != "posix":  # Windows has ACLs, not mode bits
        return
    mode = stat.S_IMODE(os.stat(key_path).st_mode)
    if mode & 0o077:
        raise PKIError(
            f"{key_path} is readable or writable by group or others (mode {mode:04o}); "
            f"a private key must be private: run `chmod 600 {key_path}`"
        )


TLS_PURPOSES = {"client": ExtendedKeyUsageOID.CLIENT_AUTH, "server": ExtendedKeyUsageOID.SERVER_AUTH}


def check_tls_purpose(cert: x509.Certificate, purpose: str, cert_path: StrPath) -> None:
    """Check that ``cert`` may serve as a TLS ``purpose`` ("client" or "server") certificate.

    Its extended key usage must list clientAuth or serverAuth, and its key usage, where
    present, must allow digital signatures (what an EC key does in a TLS handshake).

    Raises
    ------
    PKIError
        Naming the file and what the certificate lacks.
    """
    wanted = TLS_PURPOSES[purpose]
    label = f"{purpose}Auth"
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise PKIError(
            f"{cert_path} has no extended key usage; it must allow TLS {label}: "
            f"issue a {purpose} certificate with `fedgen certs issue`"
        ) from None
    if wanted not in usages:
        raise PKIError(
            f"{cert_path} is not a TLS {purpose} certificate (its extended key usage lacks "
            f"{label}); issue the right kind with `fedgen certs issue`"
        )
    try:
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not key_usage.digital_signature:
        raise PKIError(
            f"{cert_path}: its key usage does not allow digital signatures, which a TLS "
            "handshake needs; issue a new certificate with `fedgen certs issue`"
        )


def check_tls_identity(
    cert_path: StrPath, key_path: StrPath, ca_path: StrPath, purpose: str, *, at: datetime | None = None
) -> x509.Certificate:
    """Check, before connecting, what the TLS peer will check about our own certificate.

    The certificate and key belong together, the key file is private (0600), the
    consortium CA in ``ca_path`` is valid and signed the certificate, the certificate is
    valid at ``at`` (default now) and fit for ``purpose`` ("client" or "server").
    Revocation is the CRL holder's question (the aggregator's).

    Returns
    -------
    x509.Certificate
        The checked certificate.

    Raises
    ------
    PKIError
        Naming the file and the failed check.
    """
    cert, _ = check_key_pair(cert_path, key_path)
    check_key_file_mode(key_path)
    ca_cert, moment = load_certificate(ca_path), _utc(at)
    if not ca_cert.not_valid_before_utc <= moment <= ca_cert.not_valid_after_utc:
        raise PKIError(
            f"{ca_path}: the consortium CA is valid only from "
            f"{ca_cert.not_valid_before_utc.isoformat()} to {ca_cert.not_valid_after_utc.isoformat()} "
            "(check this machine's clock)"
        )
    try:
        verify_issued_by(cert, ca_cert, at=moment)
    except PKIError as exc:
        raise PKIError(f"{cert_path}: {exc} (CA {ca_path})") from None
    check_tls_purpose(cert, purpose, cert_path)
    return cert


def check_crl_signature(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate) -> None:
    """Check that the consortium CA ``ca_cert`` issued and signed ``crl``.

    Raises
    ------
    PKIError
        If it did not.
    """
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):
        raise PKIError(
            "the CRL was not signed by this consortium's CA; write a new one with `fedgen certs refresh-crl`"
        )


def crl_is_overdue(crl: x509.CertificateRevocationList, *, at: datetime | None = None) -> bool:
    """True once ``crl`` is past its next update: the CA should have issued a newer one."""
    return crl.next_update_utc is None or _utc(at) > crl.next_update_utc


def _common_name(name: x509.Name) -> str | None:
    attributes = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attributes[0].value) if attributes else None


def site_id_of(cert: x509.Certificate) -> str:
    """The site id a client certificate was issued to: its subject CN.

    Raises
    ------
    PKIError
        If the subject has no CN or the CN is not a valid site id.
    """
    common_name = _common_name(cert.subject)
    if common_name is None:
        raise PKIError(f"certificate {fingerprint(cert)[:16]}… has no CN in its subject, so it names no site")
    return validate_site_id(common_name)


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate, *, at: datetime | None = None) -> None:
    """Check that ``ca_cert`` issued ``cert`` and that ``cert`` is valid at ``at`` (default now).

    Revocation is a separate question: see `is_revoked`.

    Raises
    ------
    PKIError
        Saying which check failed: wrong issuer, bad signature, not yet valid, expired.
    """
    moment = _utc(at)
    who = f"certificate for {_common_name(cert.subject)!r} (serial {cert.serial_number:x})"
    if cert.issuer != ca_cert.subject:
        raise PKIError(
            f"{who} has the wrong issuer: issued by {cert.issuer.rfc4514_string()!r}, "
            f"not by this consortium's CA {ca_cert.subject.rfc4514_string()!r}"
        )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except InvalidSignature:
        raise PKIError(
            f"{who} has a bad signature: it was not signed by this consortium's CA "
            "(a different CA with the same name, or a tampered certificate)"
        ) from None
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{who} cannot be checked against the CA: {exc}") from None
    if moment < cert.not_valid_before_utc:
        raise PKIError(
            f"{who} is not yet valid: valid from {cert.not_valid_before_utc.isoformat()} (check this machine's clock)"
        )
    if moment > cert.not_valid_after_utc:
        raise PKIError(
            f"{who} expired on {cert.not_valid_after_utc.isoformat()}; issue a new one "
            "with `fedgen certs issue … --force`"
        )


def check_crl(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate, *, at: datetime | None = None) -> None:
    """Check that the CA signed ``crl`` and that it is current at ``at`` (default now).

    OpenSSL rejects every handshake once a loaded CRL is past its next update, so a stale
    CRL is an error here as well.

    Raises
    ------
    PKIError
        If the issuer or signature is wrong, or the CRL is stale or not yet valid.
    """
    moment = _utc(at)
    check_crl_signature(crl, ca_cert)
    if moment < crl.last_update_utc:
        raise PKIError(f"the CRL is not valid before {crl.last_update_utc.isoformat()} (check the clocks)")
    if crl_is_overdue(crl, at=moment):
        raise PKIError(
            "the CRL is past its next update; TLS peers now reject every handshake: "
            "write a new one with `fedgen certs refresh-crl` and copy it to the aggregator"
        )


def is_revoked(cert: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    """True if ``crl`` lists the certificate's serial and comes from the certificate's issuer.

    The CRL's own signature and freshness are not checked here: see `check_crl`.
    """
    return cert.issuer == crl.issuer and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def revocation_time(cert: x509.Certificate, crl: x509.CertificateRevocationList) -> datetime | None:
    """When ``crl`` says the certificate was revoked; None if it does not list it.

    The CRL's own signature and freshness are not checked here: see `check_crl`.
    """
    if cert.issuer != crl.issuer:
        return None
    revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    return None if revoked is None else revoked.revocation_date_utc


# ---------------------------------------------------------------------------- signatures


def sign_message(private_key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA (SHA-256) signature over ``message``, DER-encoded (r, s): 70-72 bytes for P-256."""
    return private_key.sign(bytes(message), ec.ECDSA(hashes.SHA256()))


def verify_message_signature(cert: x509.Certificate, message: bytes, signature: bytes) -> bool:
    """True if the key of ``cert`` made ``signature`` over ``message``, the way `sign_message` does.

    Never raises for a bad or malformed signature: that is False. Whether the certificate
    itself is trustworthy is `verify_issued_by` and `is_revoked`.
    """
    public_key = cert.public_key()
    if (
        not isinstance(public_key, ec.EllipticCurvePublicKey)
        or not isinstance(message, bytes)
        or not isinstance(signature, (bytes, bytearray, memoryview))
    ):
        return False
    try:
        public_key.verify(bytes(signature), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def sign_digest(private_key: ec.EllipticCurvePrivateKey, digest_hex: str) -> bytes:
    """Sign a SHA-256 digest (a lineage record's hash) with `sign_message`.

    The bytes signed are the UTF-8 (that is, ASCII) encoding of the 64-character lowercase
    hex digest, e.g. ``b"9f86d0…"``; ECDSA hashes them with SHA-256.

    Raises
    ------
    PKIError
        If ``digest_hex`` is not 64 lowercase hex characters.
    """
    if not isinstance(digest_hex, str) or not _DIGEST_HEX.fullmatch(digest_hex):
        raise PKIError(f"digest {digest_hex!r:.80} is not a SHA-256 hex digest (64 lowercase hex characters)")
    return sign_message(private_key, digest_hex.encode("utf-8"))


def verify_digest_signature(cert: x509.Certificate, digest_hex: str, signature: bytes) -> bool:
    """True if the key of ``cert`` made ``signature`` over ``digest_hex``, the way `sign_digest` does.

    Never raises for a bad or malformed signature or digest: those are False.
    """
    if not isinstance(digest_hex, str) or not _DIGEST_HEX.fullmatch(digest_hex):
        return False
    return verify_message_signature(cert, digest_hex.encode("utf-8"), signature)


# ---------------------------------------------------------------------------- index.json


def _read_index(files: ConsortiumLayout) -> dict[str, Any]:
    try:
        index = json.loads(files.index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PKIError(
            f"{files.index} not found: create the consortium first with "
            f"`fedgen certs init --consortium NAME --dir {files.folder}`"
        ) from None
    except (OSError, ValueError) as exc:
        raise PKIError(f"{files.index} is not readable JSON ({exc}); restore it from a backup") from None
    entries = index.get("certificates") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise PKIError(f"{files.index} has no 'certificates' list; restore it from a backup")
    for number, entry in enumerate(entries, start=1):
        missing = [f for f in _INDEX_FIELDS if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise PKIError(
                f"{files.index}: certificate entry {number} lacks {', '.join(missing)}; restore the file from a backup"
            )
    return index


def _write_index(files: ConsortiumLayout, index: dict[str, Any]) -> None:
    atomic.write_bytes(files.index, (json.dumps(index, indent=2) + "\n").encode("utf-8"), 0o644)


def _index_entry(kind: str, cert: x509.Certificate, relative_path: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "subject": _common_name(cert.subject),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "fingerprint": fingerprint(cert),
        "path": relative_path,
        "revoked_at": None,
        "reason": None,
    }


def _current_entry(index: dict[str, Any], relative_path: str) -> dict[str, Any] | None:
    """The newest index entry for a file: the certificate the file should hold now."""
    for entry in reversed(index["certificates"]):
        if entry["path"] == relative_path:
            return entry
    return None


def _cert_info(entry: dict[str, Any], problem: str | None = None) -> CertInfo:
    revoked_at = datetime.fromisoformat(entry["revoked_at"]) if entry["revoked_at"] else None
    return CertInfo(
        kind=entry["kind"],
        subject=entry["subject"],
        serial=entry["serial"],
        not_after=datetime.fromisoformat(entry["not_after"]),
        fingerprint=entry["fingerprint"],
        revoked=revoked_at is not None,
        path=entry["path"],
        revoked_at=revoked_at,
        reason=entry["reason"],
        problem=problem,
    )


# ---------------------------------------------------------------------------- building


def _key_usage(
    *,
    digital_signature: bool = False,
    content_commitment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _load_issuer(files: ConsortiumLayout, now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key, checked to pair up and to be valid at ``now``."""
    ca_cert, ca_key = check_key_pair(files.ca_cert, files.ca_key)
    if now < ca_cert.not_valid_before_utc:
        raise PKIError(
            f"{files.ca_cert} is not valid before {ca_cert.not_valid_before_utc.isoformat()} "
            "(check this machine's clock)"
        )
    if now > ca_cert.not_valid_after_utc:
        raise PKIError(
            f"{files.ca_cert} expired on {ca_cert.not_valid_after_utc.isoformat()}; "
            "start a new consortium with `fedgen certs init --force` and re-issue every certificate"
        )
    return ca_cert, ca_key


def _issue_leaf(
    files: ConsortiumLayout,
    *,
    kind: str,
    common_name: str,
    extensions: list[x509.ExtensionType],
    cert_path: Path,
    key_path: Path,
    days: int,
    force: bool,
    now: datetime | None,
    with_organization: bool = False,
    overwrite_hint: str = "",
) -> Path:
    """Issue an end-entity certificate; a replaced certificate is revoked as superseded.

    ``with_organization`` puts the consortium name (the CA's O) into the subject.
    """
    days, moment = _validate_days(days), _utc(now)
    index = _read_index(files)
    ca_cert, ca_key = _load_issuer(files, moment)
    _refuse_overwrite([cert_path, key_path], force, overwrite_hint)
    not_after = moment + timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        raise PKIError(
            f"a {days}-day certificate would outlive the CA in {files.ca_cert} (expires "
            f"{ca_cert.not_valid_after_utc.date()}); use fewer --days or start a new consortium"
        )
    organization = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) if with_organization else []
    subject = x509.Name([*organization, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for extension in extensions:
        # Key usage is critical (RFC 5280 §4.2.1.3); the rest are informational.
        builder = builder.add_extension(extension, critical=isinstance(extension, x509.KeyUsage))
    cert = builder.sign(ca_key, hashes.SHA256())

    relative_path = files.relative(cert_path)
    previous = _current_entry(index, relative_path)
    _write_key(key_path, key)
    atomic.write_bytes(cert_path, _pem(cert), 0o644)
    index["certificates"].append(_index_entry(kind, cert, relative_path))
    if previous is not None and previous["revoked_at"] is None:
        previous.update(revoked_at=moment.isoformat(), reason="superseded")
        _write_crl(files, index, ca_cert, ca_key, moment, CRL_DAYS)
    _write_index(files, index)
    return cert_path


def _revoked_entry(entry: dict[str, Any]) -> x509.RevokedCertificate:
    builder = (
        x509.RevokedCertificateBuilder()
        .serial_number(int(entry["serial"], 16))
        .revocation_date(datetime.fromisoformat(entry["revoked_at"]))
    )
    # RFC 5280 §5.3.1: leave the reason code out rather than write "unspecified".
    if entry["reason"] != "unspecified":
        builder = builder.add_extension(x509.CRLReason(x509.ReasonFlags[entry["reason"]]), critical=False)
    return builder.build()


def _write_crl(
    files: ConsortiumLayout,
    index: dict[str, Any],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    days: int,
) -> None:
    """Sign and write a full CRL of every revoked entry; bumps ``index["crl_number"]``.

    Callers write the CRL before index.json: if the two ever disagree after a crash, the
    revocation is already in force.
    """
    index["crl_number"] = int(index.get("crl_number", 0)) + 1
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(index["crl_number"]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for entry in index["certificates"]:
        if entry["revoked_at"] is not None:
            builder = builder.add_revoked_certificate(_revoked_entry(entry))
    crl = builder.sign(ca_key, hashes.SHA256())
    atomic.write_bytes(files.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)


# ---------------------------------------------------------------------------- commands


def init_consortium(
    folder: StrPath, name: str, *, days: int = CA_DAYS, force: bool = False, now: datetime | None = None
) -> Path:
    """Create the consortium CA, an empty CRL and index.json in ``folder``.

    With ``force`` an existing CA is replaced: every certificate it issued stops being
    trusted and must be issued again.

    Returns
    -------
    Path
        The CA certificate, ``<folder>/ca.pem``.
    """
    files, days, moment = layout(folder), _validate_days(days), _utc(now)
    name = name.strip() if isinstance(name, str) else ""
    if not name or len(name) > _MAX_NAME or not name.isprintable():
        raise PKIError(f"consortium name {name!r} must be 1-{_MAX_NAME} printable characters (--consortium)")
    _refuse_overwrite([files.ca_cert, files.ca_key, files.crl, files.index], force)
    key = _new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} consortium CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - CLOCK_SKEW)
        .not_valid_after(moment + timedelta(days=days))
        # path_length=0: the CA signs end-entity certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    index: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "consortium": name,
        "crl_number": 0,
        "certificates": [_index_entry("ca", cert, files.relative(files.ca_cert))],
    }
    _write_key(files.ca_key, key)
    atomic.write_bytes(files.ca_cert, _pem(cert), 0o644)
    _write_crl(files, index, cert, key, moment, CRL_DAYS)
    _write_index(files, index)
    return files.ca_cert


def issue_aggregator(
    folder: StrPath, hosts: list[str], *, days: int = CERT_DAYS, force: bool = False, now: datetime | None = None
) -> Path:
    """Issue the aggregator's TLS server certificate for ``hosts`` (DNS names or IP literals).

    CN is the first host; every host goes into the subjectAltName, which is what TLS
    clients match. A replaced aggregator certificate is revoked as superseded.

    Returns
    -------
    Path
        The certificate, ``<folder>/aggregator.pem`` (its key is ``aggregator.key``).
    """
    files, hosts = layout(folder), _validate_hosts(list(hosts))
    alt_names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    return _issue_leaf(
        files,
        kind="aggregator",
        common_name=hosts[0],
        extensions=[
            x509.SubjectAlternativeName(alt_names),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
            _key_usage(digital_signature=True, key_agreement=True),
        ],
        cert_path=files.aggregator_cert,
        key_path=files.aggregator_key,
        days=days,
        force=force,
        now=now,
    )


def issue_lineage(folder: StrPath, *, days: int = CERT_DAYS, force: bool = False, now: datetime | None = None) -> Path:
    """Issue the aggregator's lineage-signing certificate, with a key of its own.

    Its only extended key usage is `LINEAGE_SIGNING_OID`: it cannot serve TLS, and no TLS
    or site certificate can sign the ledger. CN is `LINEAGE_SIGNER_CN`, O the consortium
    name. A replaced lineage certificate is revoked as superseded; records it signed
    before stay valid (pass both certificates to `fedgen lineage verify`).

    Returns
    -------
    Path
        The certificate, ``<folder>/lineage.pem`` (its key is ``lineage.key``).
    """
    files = layout(folder)
    return _issue_leaf(
        files,
        kind="lineage",
        common_name=LINEAGE_SIGNER_CN,
        with_organization=True,
        extensions=[
            x509.ExtendedKeyUsage([LINEAGE_SIGNING_OID]),
            _key_usage(digital_signature=True, content_commitment=True),
        ],
        cert_path=files.lineage_cert,
        key_path=files.lineage_key,
        days=days,
        force=force,
        now=now,
        overwrite_hint=" (rotation: the old certificate is then revoked as superseded)",
    )


def check_lineage_signer(cert: x509.Certificate) -> None:
    """Check that ``cert`` is a lineage-signing certificate: its extended key usage is exactly `LINEAGE_SIGNING_OID`.

    Whether the consortium CA issued it is `verify_issued_by`.

    Raises
    ------
    PKIError
        Naming the certificate and what it is for instead (TLS server or client, none).
    """
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    if usages == [LINEAGE_SIGNING_OID]:
        return
    names = {
        ExtendedKeyUsageOID.SERVER_AUTH: "TLS server (serverAuth: the aggregator's TLS certificate)",
        ExtendedKeyUsageOID.CLIENT_AUTH: "TLS client (clientAuth: a site's certificate)",
        LINEAGE_SIGNING_OID: "lineage signing",
    }
    purposes = ", ".join(names.get(oid, oid.dotted_string) for oid in usages) or "no extended key usage"
    raise PKIError(
        f"certificate for {_common_name(cert.subject)!r} (serial {cert.serial_number:x}, "
        f"fingerprint {fingerprint(cert)[:16]}…) is not a lineage-signing certificate: its "
        f"extended key usage is {purposes}; only the certificate of `fedgen certs issue lineage` "
        "may sign the lineage ledger"
    )


def issue_site(
    folder: StrPath, site_id: str, *, days: int = CERT_DAYS, force: bool = False, now: datetime | None = None
) -> Path:
    """Issue a site's TLS client certificate (CN = ``site_id``, O = the consortium name).

    Re-issuing an existing site id needs ``force`` (key rotation); the old certificate is
    then revoked as superseded.

    Returns
    -------
    Path
        The certificate, ``<folder>/sites/<site_id>.pem`` (its key is ``<site_id>.key``).
    """
    files = layout(folder)
    return _issue_leaf(
        files,
        kind="site",
        common_name=site_id,
        with_organization=True,
        extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), _key_usage(digital_signature=True)],
        cert_path=files.site_cert(site_id),
        key_path=files.site_key(site_id),
        days=days,
        force=force,
        now=now,
        overwrite_hint=" (key rotation: the old certificate is then revoked)",
    )


def revoke_site(folder: StrPath, site_id: str, reason: str = "unspecified", *, now: datetime | None = None) -> CertInfo:
    """Revoke a site's current certificate: add it to a re-signed CRL and mark it in index.json.

    Returns
    -------
    CertInfo
        The revoked certificate.

    Raises
    ------
    PKIError
        If the site is unknown (the message lists the known ones), already revoked, or the
        reason is not one of ``REVOCATION_REASONS``.
    """
    files, reason = layout(folder), _reason_name(reason)
    index = _read_index(files)
    entry = _current_entry(index, files.relative(files.site_cert(site_id)))
    if entry is None:
        known = sorted({e["subject"] for e in index["certificates"] if e["kind"] == "site"})
        listing = f"known sites: {', '.join(known)}" if known else "no site certificates have been issued yet"
        raise PKIError(f"unknown site {site_id!r} in {files.index}; {listing}")
    return _revoke(
        files,
        index,
        entry,
        reason,
        now,
        f"to let it back in, issue a new certificate with `fedgen certs issue site {site_id} --force`",
    )


def revoke_lineage(folder: StrPath, reason: str = "unspecified", *, now: datetime | None = None) -> CertInfo:
    """Revoke the current lineage-signing certificate (e.g. its key was compromised).

    Records signed at or after the revocation time no longer verify against the CRL;
    issue a new one with `issue_lineage` (``force``) to go on signing.

    Raises
    ------
    PKIError
        If no lineage certificate was issued, it is already revoked, or the reason is unknown.
    """
    files, reason = layout(folder), _reason_name(reason)
    index = _read_index(files)
    entry = _current_entry(index, files.relative(files.lineage_cert))
    if entry is None:
        raise PKIError(f"no lineage-signing certificate in {files.index}; issue one with `fedgen certs issue lineage`")
    return _revoke(files, index, entry, reason, now, "issue a new one with `fedgen certs issue lineage --force`")


def _revoke(
    files: ConsortiumLayout,
    index: dict[str, Any],
    entry: dict[str, Any],
    reason: str,
    now: datetime | None,
    reissue_hint: str,
) -> CertInfo:
    reason, moment = _reason_name(reason), _utc(now)
    if entry["revoked_at"] is not None:
        raise PKIError(
            f"{entry['kind']} certificate {entry['subject']!r} (serial {entry['serial']}) is already "
            f"revoked ({entry['reason']}, {entry['revoked_at']}); {reissue_hint}"
        )
    ca_cert, ca_key = _load_issuer(files, moment)
    entry.update(revoked_at=moment.isoformat(), reason=reason)
    _write_crl(files, index, ca_cert, ca_key, moment, CRL_DAYS)
    _write_index(files, index)
    return _cert_info(entry)


def refresh_crl(folder: StrPath, *, days: int = CRL_DAYS, now: datetime | None = None) -> Path:
    """Re-sign the CRL with a new next update ``days`` from now (do it well before it lapses).

    Returns
    -------
    Path
        The CRL, ``<folder>/crl.pem``.
    """
    files, days, moment = layout(folder), _validate_days(days), _utc(now)
    index = _read_index(files)
    ca_cert, ca_key = _load_issuer(files, moment)
    _write_crl(files, index, ca_cert, ca_key, moment, days)
    _write_index(files, index)
    return files.crl


# ---------------------------------------------------------------------------- listing


def _file_problems(files: ConsortiumLayout, entry: dict[str, Any]) -> list[str]:
    """How the certificate file (and its key, where present) disagrees with its index entry."""
    cert_path = files.folder / entry["path"]
    try:
        cert = load_certificate(cert_path)
    except PKIError as exc:
        return [str(exc)]
    if fingerprint(cert) != entry["fingerprint"]:
        return [
            f"{cert_path} is not the certificate {files.index} records (fingerprint "
            f"{fingerprint(cert)[:16]}…, expected {entry['fingerprint'][:16]}…)"
        ]
    key_path = cert_path.with_suffix(".key")
    if not key_path.exists():  # site keys may rightly have left for their site
        return []
    try:
        key = load_private_key(key_path)
    except PKIError as exc:
        return [str(exc)]
    return [] if certificate_matches_key(cert, key) else [f"{cert_path} does not match its key {key_path}"]


def _crl_state(files: ConsortiumLayout, now: datetime) -> tuple[set[int] | None, str | None]:
    """The serials crl.pem revokes (None if unusable) and what is wrong with it, if anything."""
    try:
        crl, ca_cert = load_crl(files.crl), load_certificate(files.ca_cert)
    except PKIError as exc:
        return None, str(exc)
    try:
        check_crl(crl, ca_cert, at=now)
    except PKIError as exc:
        return None, f"{files.crl}: {exc}"
    return {revoked.serial_number for revoked in crl}, None


def _unlisted(files: ConsortiumLayout, path: Path) -> CertInfo:
    kind = "site" if path.parent == files.sites else path.stem
    problem = f"{path} is not listed in {files.index} (issued elsewhere, or the index was replaced)"
    try:
        cert = load_certificate(path)
    except PKIError as exc:
        return CertInfo(
            kind=kind,
            subject=path.stem,
            serial="",
            not_after=None,
            fingerprint="",
            revoked=False,
            path=files.relative(path),
            problem=f"{problem}; {exc}",
        )
    return CertInfo(
        kind=kind,
        subject=_common_name(cert.subject) or "",
        serial=f"{cert.serial_number:x}",
        not_after=cert.not_valid_after_utc,
        fingerprint=fingerprint(cert),
        revoked=False,
        path=files.relative(path),
        problem=problem,
    )


def list_certificates(folder: StrPath, *, now: datetime | None = None) -> list[CertInfo]:
    """Every certificate index.json records, oldest first, then any certificate file it does not.

    Each certificate file is checked against its newest index entry (fingerprint, and the
    key where present), each entry's revocation against crl.pem, and the CRL's signature
    and freshness are reported on the CA's entry. Disagreements go into
    ``CertInfo.problem``; nothing is repaired.

    Raises
    ------
    PKIError
        If index.json is missing or unreadable.
    """
    files, moment = layout(folder), _utc(now)
    index = _read_index(files)
    entries = index["certificates"]
    newest = {entry["path"]: number for number, entry in enumerate(entries)}
    crl_serials, crl_problem = _crl_state(files, moment)
    infos = []
    for number, entry in enumerate(entries):
        problems = _file_problems(files, entry) if newest[entry["path"]] == number else []
        if crl_serials is not None and (int(entry["serial"], 16) in crl_serials) != (entry["revoked_at"] is not None):
            state = "revoked" if entry["revoked_at"] else "not revoked"
            problems.append(f"{files.index} says {state} but {files.crl} disagrees; run `fedgen certs refresh-crl`")
        if entry["kind"] == "ca" and crl_problem:
            problems.append(crl_problem)
        infos.append(_cert_info(entry, "; ".join(problems) or None))
    on_disk = [files.ca_cert, files.aggregator_cert, files.lineage_cert, *sorted(files.sites.glob("*.pem"))]
    infos += [_unlisted(files, path) for path in on_disk if path.exists() and files.relative(path) not in newest]
    return infos
