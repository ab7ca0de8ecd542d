"""Why the aggregator refused this site, in words a site operator can act on.

A refused TLS handshake reaches the site as the alert the aggregator sent ("certificate
expired", "unknown CA", ...) inside httpx's transport error; a refused request as a 401
with the aggregator's reason; a failed check of the aggregator's own certificate as a
verification error. Anything else (the aggregator down or restarting) is no refusal: the
site keeps trying.
"""

from __future__ import annotations

import json
import ssl

import httpx

_ALERTS = {
    "CERTIFICATE_EXPIRED": "the aggregator refused this site's certificate: it has expired (or this "
    "machine's clock is wrong); ask the consortium operator for a new one",
    "CERTIFICATE_REVOKED": "the aggregator refused this site's certificate: it is revoked",
    "UNKNOWN_CA": "the aggregator does not accept this site's certificate: it was not issued by the "
    "consortium CA the aggregator trusts",
    "CERTIFICATE_REQUIRED": "the aggregator requires a client certificate and this site presented none",
}
_NOT_TLS = ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE")


def _causes(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _response_detail(response: httpx.Response) -> str:
    text = response.text.strip()
    try:
        detail = json.loads(text).get("detail")
    except (ValueError, AttributeError):
        return text
    return str(detail) if detail else text


def refusal_cause(error: BaseException) -> str | None:
    """Why a Fleet request failed for good, in words a site operator can act on.

    None when retrying may help (the aggregator is down or restarting, a network blip).
    """
    for cause in _causes(error):
        if isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 401:
            return f"the aggregator refused this site: {_response_detail(cause.response)}"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"the aggregator's certificate failed verification: {cause.verify_message}; check "
                "`aggregator` (its host name) and `tls.ca_certificate` in the site config"
            )
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLEOFError):
            reason = str(cause.reason or "")
            if "_ALERT_" in reason:
                alert = reason.split("_ALERT_", 1)[1]
                return _ALERTS.get(
                    alert, f"the aggregator refused the TLS handshake ({alert.replace('_', ' ').lower()})"
                )
            if reason in _NOT_TLS:
                return (
                    "the aggregator's address does not answer with TLS; check `aggregator` "
                    "(host:port of its Fleet API) in the site config"
                )
    return None
