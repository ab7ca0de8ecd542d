"""fedgen's Flower ClientApp: one site's answer to a train message.

Deployed, the ClientApp process Flower starts for each message is a thin relay: it hands
the message content to the site's warm worker (`fedgen.client.worker`, started by
`fedgen site start`) over the site's 0600 Unix socket and returns the worker's reply. It
imports neither torch nor the data: those live in the worker. A site whose SuperNode was
started without a worker (by hand, with `flower-supernode`) runs the round in the
ClientApp process itself, cold, as every round did before the worker existed; the site's
round lock keeps such a round from overlapping one of a worker. In simulation the round
runs in the Ray actor's process, whose warm cache outlives the call.

The round itself is `fedgen.client.round`. Every failure becomes an error reply whose
reason names no path and no sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedgen.config import SiteConfig, load_toml
from fedgen.protocol import SITE_ERROR
from fedgen.state_files import WORKER_SOCKET_FILE

from .channel import RoundRefused, WorkerUnavailable, request_round

log = logging.getLogger(__name__)

SITE_CONFIG_NODE_KEY = "site-config"
SiteResolver = Callable[[Context], SiteConfig]
# (site, what the aggregator sent, the honest reply) -> the reply actually sent.
ReplyTamper = Callable[[SiteConfig, RecordDict, RecordDict], RecordDict]
# (site, message content, run id) -> reply content; raises RoundRefused to refuse.
RoundRunner = Callable[[SiteConfig, RecordDict, int], RecordDict]


def site_from_node_config(context: Context) -> SiteConfig:
    """Deployment: the SuperNode's node config names the site's TOML file."""
    path = context.node_config.get(SITE_CONFIG_NODE_KEY)
    if not path:
        raise RuntimeError(
            f"SuperNode started without node config {SITE_CONFIG_NODE_KEY!r}; "
            "start sites with `fedgen site start --config site.toml`"
        )
    return load_toml(str(path), SiteConfig)


def in_process_round(site: SiteConfig, content: RecordDict, run_id: int) -> RecordDict:
    """Run the round in this process (its warm cache lasts as long as the process)."""
    from .round import answer_round  # torch and the data only where a round runs

    return answer_round(site, content, run_id)


def relayed_round(site: SiteConfig, content: RecordDict, run_id: int) -> RecordDict:
    """Have the site's worker run the round; without a worker, run it here.

    Once the request is sent the worker's answer is final: a worker lost mid-round is an
    error reply, never a second run of the round (the lost one may have spent budget).
    """
    try:
        return request_round(site.state_dir / WORKER_SOCKET_FILE, run_id, content)
    except WorkerUnavailable as exc:
        log.warning("site %s: %s; training this round in the ClientApp process (cold)", site.site_id, exc)
    return in_process_round(site, content, run_id)


def make_client_app(
    resolve_site: SiteResolver = site_from_node_config,
    tamper: ReplyTamper | None = None,
    run_round: RoundRunner = in_process_round,
) -> ClientApp:
    """Build the ClientApp; ``resolve_site`` maps a node's context to its SiteConfig.

    ``run_round`` runs the round: in this process (simulation), or relayed to the site's
    worker (deployment). ``tamper`` exists for simulations of misbehaving sites
    (`fedgen simulate --adversary`).
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site_id = "unknown-site"
        try:
            site = resolve_site(context)
            site_id = site.site_id
            content = run_round(site, msg.content, msg.metadata.run_id)
            if tamper is not None:
                content = tamper(site, msg.content, content)
            return Message(content, reply_to=msg)
        except RoundRefused as exc:  # its reason was written to name no path
            code, reason = exc.code, exc.reason
        except Exception as exc:  # noqa: BLE001 - reported to the aggregator without detail
            log.exception("site %s: round failed", site_id)
            code, reason = SITE_ERROR, f"{type(exc).__name__} (details in the site's log)"
        return Message(Error(code=code, reason=f"site {site_id}: {reason}"), reply_to=msg)

    return app


app = make_client_app(run_round=relayed_round)

__all__ = ["app", "in_process_round", "make_client_app", "relayed_round", "site_from_node_config"]
