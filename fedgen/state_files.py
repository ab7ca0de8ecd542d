"""The names of the files fedgen keeps in a state or run folder: each named here once.

A site's state folder holds its privacy ledger, lineage receipts, round lock and its
worker's socket; the aggregator's holds the lineage ledger, the checkpoints, Flower's
database and the fleet registry; a run's folder (or a simulation's) holds its progress,
its result and its own ledger and checkpoints.
"""

from __future__ import annotations

LINEAGE_FILE = "lineage.jsonl"  # the signed, hash-chained lineage ledger
CHECKPOINTS_DIR = "checkpoints"  # one safetensors file per committed round
PRIVACY_LEDGER_FILE = "privacy-ledger.json"  # a site's accountant history
RECEIPTS_FILE = "lineage-receipts.jsonl"  # a site's signed witnesses of the ledger heads it saw
GRADIENT_CHECKS_FILE = "gradient-checks.json"  # a site's verdicts on Opacus' per-sample gradients
FLEET_REGISTRY_FILE = "fleet-registry.json"  # which site holds which Flower node, and refusals
FLOWER_DATABASE = "flower.db"  # the SuperLink's own state
PROGRESS_FILE = "progress.jsonl"  # a run's committed rounds, for the coordinator to follow
RESULT_FILE = "result.json"  # a run's `fedgen.results.RunResult`
PLAN_FILE = "plan.json"  # what the coordinator asks of the ServerApp (`fedgen.server.plan.RunPlan`)
FAILURE_FILE = "failure.json"  # why the ServerApp stopped, for `fedgen run` to print
WORKER_SOCKET_FILE = "worker.sock"  # a site's warm worker listens here (0600), for its ClientApp relays
ROUND_LOCK_FILE = "round.lock"  # held by whichever process runs one of the site's rounds
